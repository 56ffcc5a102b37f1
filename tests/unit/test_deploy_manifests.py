"""deploy/docker and deploy/kubernetes: the files agree with tunneld and with each other.

No container engine or cluster runs here, so the contract is checked where it is written down:
the Dockerfile copies only what exists and what the build context admits, runs as a numeric
non-root user, checks health with ``tunneld ready`` and stops with SIGTERM; compose.yaml and the
Kubernetes manifests parse, grant exactly NET_ADMIN, and their configuration (environment, the
ConfigMap's file) is one that ``tunneld.config.load_config`` accepts — so every ``TUNNELD_*``
name is a real one — with probes and scrape ports on the daemon's metrics port.
tests/integration/test_container_contract.py then runs the image's contract for real.

The helpers here (Dockerfile instructions, compose interpolation) are shared with that test.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tunneld.config import DEFAULT_PRIVATE_KEY_FILE, load_config
from tunneld.config_metrics import DEFAULT_LISTEN
from tunneld.config_proxy import ProxyConfig
from tunneld.keys import encode_key, generate_private_key, public_key
from tunneld.preflight import LOCK_DIRECTORY
from tunneld.wireguard.userspace import SOCKET_DIRECTORY

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"  # the build context is the repository root
KUBERNETES = ROOT / "deploy" / "kubernetes"

DRAIN_MARGIN_SECONDS = 10  # on top of proxy.shutdown_grace: tearing the interface down


# -- the Dockerfile ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    arguments: str  # the rest, continuation lines joined

    def exec_form(self) -> list[str]:
        """The JSON array of ``CMD ["a", "b"]`` (the exec form, no shell)."""
        value = json.loads(self.arguments)
        assert isinstance(value, list), f"{self.keyword} is not in exec form: {self.arguments}"
        return [str(item) for item in value]


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """The instructions of a Dockerfile: comments dropped, ``\\`` continuations joined."""
    instructions: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue  # parser directives (# syntax=) are comments too, for this purpose
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [index for index, item in enumerate(instructions) if item.keyword == "FROM"]
    return instructions[starts[-1] :]


def one(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [item for item in instructions if item.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def image_user(instructions: list[Instruction] | None = None) -> tuple[int, int]:
    """The final stage's ``USER uid:gid``."""
    user = one(final_stage(instructions or dockerfile_instructions()), "USER").arguments
    assert re.fullmatch(r"[0-9]+:[0-9]+", user), (
        f"USER {user}: write it as numeric uid:gid, or Kubernetes' runAsNonRoot cannot verify it"
    )
    uid, gid = user.split(":")
    return int(uid), int(gid)


def file_capabilities(instructions: list[Instruction] | None = None) -> dict[str, str]:
    """What the final stage ``setcap``s: target (as written) -> capability text."""
    found: dict[str, str] = {}
    for item in final_stage(instructions or dockerfile_instructions()):
        if item.keyword != "RUN":
            continue
        for command in re.split(r"&&|;", item.arguments):
            words = shlex.split(command)
            if words[:1] == ["setcap"]:
                assert len(words) == 3, f"setcap CAPS FILE expected: {command}"
                found[words[2]] = words[1]
    return found


def _copy_sources(instructions: list[Instruction]) -> Iterator[tuple[Instruction, list[str]]]:
    for item in instructions:
        if item.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(item.arguments)
        flags = [word for word in words if word.startswith("--")]
        paths = [word for word in words if not word.startswith("--")]
        if any(flag.startswith("--from=") for flag in flags):
            continue  # from another stage, not from the build context
        yield item, paths[:-1]


def dockerignore_admits(relative: str, patterns: list[str]) -> bool:
    """Whether ``relative`` (a path in the context) is sent, by the subset of .dockerignore
    syntax the file uses: ``*`` and ``**`` globs, ``!`` exceptions, the last match wins, and a
    pattern that matches a directory applies to everything below it.
    """
    admitted = True
    parts = PurePosixPath(relative).parts
    candidates = ["/".join(parts[: end + 1]) for end in range(len(parts))]
    for pattern in patterns:
        exception = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip("/")
        if any(fnmatch.fnmatchcase(candidate, glob) for candidate in candidates):
            admitted = exception
    return admitted


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_every_file_the_dockerfile_copies_exists_and_is_in_the_build_context() -> None:
    instructions = dockerfile_instructions()
    patterns = dockerignore_patterns()
    copied: list[str] = []
    for item, sources in _copy_sources(instructions):
        assert sources, f"{item.keyword} {item.arguments}: no source"
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"{item.keyword} {item.arguments}: {source} does not exist"
            files = [path] if path.is_file() else sorted(path.rglob("*.py"))
            assert files, f"{source}: nothing to copy"
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                assert dockerignore_admits(relative, patterns), f".dockerignore excludes {relative}"
                copied.append(relative)
    assert "pyproject.toml" in copied
    assert "tunneld/cli.py" in copied
    # The README and LICENSE are package metadata (pyproject's readme and license).
    for metadata in ("README.md", "LICENSE"):
        assert metadata in copied
    # And nothing else goes to the builder: no virtualenv, no .git, no tests.
    for private in (
        ".venv/pyvenv.cfg",
        ".git/HEAD",
        "tests/conftest.py",
        "tunneld/__pycache__/x.pyc",
    ):
        assert not dockerignore_admits(private, patterns), f".dockerignore admits {private}"


def test_the_final_stage_copies_from_the_build_stage_only() -> None:
    instructions = dockerfile_instructions()
    stages = [item.arguments.split() for item in instructions if item.keyword == "FROM"]
    assert [stage[1:] for stage in stages] == [["AS", "build"], []]
    copied_from = [
        re.findall(r"--from=(\S+)", item.arguments)
        for item in final_stage(instructions)
        if item.keyword == "COPY"
    ]
    assert copied_from == [["build"]]


def test_the_image_runs_tunneld_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    uid, gid = image_user(instructions)
    assert uid != 0 and gid != 0
    final = final_stage(instructions)
    entrypoint = one(final, "ENTRYPOINT").exec_form()  # exec form: tunneld is PID 1
    assert entrypoint == ["/opt/tunneld/bin/tunneld"]
    assert one(final, "CMD").exec_form() == ["run"]
    assert one(final, "STOPSIGNAL").arguments == "SIGTERM"
    healthcheck = one(final, "HEALTHCHECK").arguments
    options, _, command = healthcheck.partition(" CMD ")
    assert json.loads(command) == ["tunneld", "ready"], healthcheck
    assert "--start-period=" in options  # a first handshake takes a while
    # Exposed, if anything, is the metrics port; by default it listens on loopback only.
    for item in final:
        if item.keyword == "EXPOSE":
            assert item.arguments.split() in (
                [str(DEFAULT_LISTEN.port)],
                [f"{DEFAULT_LISTEN.port}/tcp"],
            )


def test_the_image_keeps_the_key_in_a_volume_and_owns_its_runtime_directories() -> None:
    final = final_stage(dockerfile_instructions())
    volumes = json.loads(one(final, "VOLUME").arguments)
    assert str(DEFAULT_PRIVATE_KEY_FILE.parent) in volumes
    run = " ".join(item.arguments for item in final if item.keyword == "RUN")
    uid, gid = image_user()
    # /var/run is /run in Debian: wireguard-go's socket directory is /run/wireguard.
    socket_directory = str(SOCKET_DIRECTORY).replace("/var/run/", "/run/")
    for directory, mode in (
        (DEFAULT_PRIVATE_KEY_FILE.parent, "0700"),
        (LOCK_DIRECTORY, "0755"),
        (Path(socket_directory), "0755"),
    ):
        created = re.search(rf"install -d -o {uid} -g {gid} -m {mode} [^&]*{directory}\b", run)
        assert created, f"{directory} is not created for {uid}:{gid} (mode {mode})"


def test_the_image_has_wireguard_go_and_file_capabilities_that_never_block_exec() -> None:
    run = " ".join(
        item.arguments for item in final_stage(dockerfile_instructions()) if item.keyword == "RUN"
    )
    for package in ("wireguard-go", "wireguard-tools", "iproute2", "libcap2-bin", "libnftables1"):
        assert re.search(rf"apt-get install [^&]*\b{package}\b", run), package
    capabilities = file_capabilities()
    # The interpreter: permitted only (=p), so the kernel never refuses to run it where the
    # runtime grants less (tunneld makes what it got effective); NET_ADMIN among them.
    interpreter = capabilities.pop("$interpreter")
    names, _, flags = interpreter.partition("=")
    assert flags == "p", f"the interpreter's capabilities must be permitted-only: {interpreter}"
    assert "cap_net_admin" in names.split(",")
    assert set(names.split(",")) <= {"cap_net_admin", "cap_net_bind_service", "cap_net_raw"}
    # wireguard-go is started by tunneld, which needs NET_ADMIN first: effective is safe there.
    assert capabilities == {"/usr/bin/wireguard-go": "cap_net_admin=ep"}


# -- compose.yaml --------------------------------------------------------------------------------


def interpolate(text: str, values: Mapping[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}``, from ``values``."""

    def replace(match: re.Match[str]) -> str:
        name, operator, argument = match[1], match[2], match[3]
        if name in values:
            return values[name]
        assert operator == ":-", f"${{{name}}} has no default and no test value"
        return argument

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", replace, text)


def load_compose(values: Mapping[str, str]) -> dict[str, Any]:
    document = yaml.safe_load(interpolate(COMPOSE.read_text(), values))
    assert isinstance(document, dict)
    return document


def compose_values() -> dict[str, str]:
    """Values for the compose file's variables: a real gateway key, an IP endpoint."""
    return {
        "TUNNELD_GATEWAY_PUBLIC_KEY": encode_key(public_key(generate_private_key())),
        "TUNNELD_GATEWAY_ENDPOINT": "198.18.0.1:51820",
    }


def test_compose_runs_tunneld_as_a_sidecar_in_the_apps_network_namespace() -> None:
    services = load_compose(compose_values())["services"]
    assert set(services) == {"app", "tunneld"}
    tunneld, app = services["tunneld"], services["app"]
    assert tunneld["network_mode"] == "service:app"
    for service in (tunneld, app):
        assert "ports" not in service, "nothing is published: the only way in is the tunnel"
        assert "no-new-privileges:true" in service["security_opt"]
        assert service["read_only"] is True
    assert tunneld["cap_drop"] == ["ALL"]
    assert tunneld["cap_add"] == ["NET_ADMIN"]
    assert "/dev/net/tun:/dev/net/tun" in tunneld["devices"]
    assert tunneld["stop_signal"] == "SIGTERM"
    grace = ProxyConfig().shutdown_grace_seconds + DRAIN_MARGIN_SECONDS
    assert _seconds(tunneld["stop_grace_period"]) >= grace
    build = tunneld["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert f"tunneld-key:{DEFAULT_PRIVATE_KEY_FILE.parent}" in tunneld["volumes"]
    # With a read-only root, /run (the lock and wireguard-go's socket) is a tmpfs of the user.
    uid, gid = image_user()
    (tmpfs,) = tunneld["tmpfs"]
    assert tmpfs.startswith("/run:") and f"uid={uid}" in tmpfs and f"gid={gid}" in tmpfs
    assert LOCK_DIRECTORY.is_relative_to("/run")


def test_compose_lets_the_non_root_user_bind_port_80_and_ping_without_capabilities() -> None:
    services = load_compose(compose_values())["services"]
    sysctls = services["app"]["sysctls"]  # the namespace's owner: Docker refuses them on a joiner
    assert int(sysctls["net.ipv4.ip_unprivileged_port_start"]) <= ProxyConfig().http_port
    low, high = (int(part) for part in sysctls["net.ipv4.ping_group_range"].split())
    _, gid = image_user()
    assert low <= gid <= high


def test_compose_configures_tunneld_from_the_environment_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = compose_values()
    environment = load_compose(values)["services"]["tunneld"]["environment"]
    assert all(isinstance(value, str) for value in environment.values()), "quote every value"
    assert all(name.startswith("TUNNELD_") for name in environment)
    # No file at all, as in the image: the environment is the whole configuration.
    monkeypatch.setattr("tunneld.config.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    monkeypatch.chdir(tmp_path)
    config = load_config(environ=environment)
    assert config.source == "environment"
    assert config.interface.private_key.path == DEFAULT_PRIVATE_KEY_FILE
    (gateway,) = config.gateways
    assert encode_key(gateway.public_key) == values["TUNNELD_GATEWAY_PUBLIC_KEY"]
    assert [str(endpoint) for endpoint in gateway.endpoints] == [values["TUNNELD_GATEWAY_ENDPOINT"]]
    (service,) = config.services
    assert str(service.upstream) == "http://127.0.0.1:8080"
    assert config.metrics.ready_services == (service.name,)
    assert config.metrics.listen == DEFAULT_LISTEN  # the HEALTHCHECK asks it on loopback
    # Without the gateway's key, compose refuses to start rather than run with a placeholder.
    assert "${TUNNELD_GATEWAY_PUBLIC_KEY:?" in COMPOSE.read_text()


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"([0-9]+)(s|m)", duration)
    assert match, duration
    return int(match[1]) * (60 if match[2] == "m" else 1)


# -- Kubernetes ----------------------------------------------------------------------------------


def kubernetes_documents() -> dict[str, dict[str, Any]]:
    """``kind`` -> the document, from every manifest in deploy/kubernetes (one kind each)."""
    documents: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict) and "kind" in document, path
            assert document["kind"] not in documents, f"two {document['kind']}s"
            documents[document["kind"]] = document
    return documents


def _pod(documents: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = documents["Deployment"]["spec"]["template"]["spec"]
    return spec


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in [*pod.get("initContainers", []), *pod["containers"]] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def _metrics_port(container: dict[str, Any]) -> int:
    (port,) = [port for port in container["ports"] if port["name"] == "metrics"]
    return int(port["containerPort"])


def test_kustomization_lists_every_manifest_and_names_the_image() -> None:
    documents = kubernetes_documents()
    kustomization = documents.pop("Kustomization")
    files = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert set(documents) == {"ConfigMap", "Deployment", "PodMonitor"}
    pod = _pod(documents)
    images = {c["image"] for c in pod["initContainers"]}
    assert images == {image["name"] for image in kustomization["images"]} == {"tunneld"}


def test_tunneld_is_a_native_sidecar_with_only_net_admin() -> None:
    documents = kubernetes_documents()
    deployment, pod = documents["Deployment"], _pod(documents)
    assert [c["name"] for c in pod["containers"]] == ["app"]
    init = {c["name"]: c for c in pod["initContainers"]}
    assert list(init) == ["tunneld-key", "tunneld"]  # the key is in place before tunneld starts
    assert init["tunneld"]["restartPolicy"] == "Always"
    assert "command" not in init["tunneld"] and init["tunneld"]["args"] == ["run"]  # ENTRYPOINT
    assert "restartPolicy" not in init["tunneld-key"]  # a plain init container: runs to its end
    security = init["tunneld"]["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid, gid = image_user()
    assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid)
    for container in (init["tunneld-key"], _container(pod, "app")):
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # One key, one pod, and no two pods with the key during a rollout.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    grace = ProxyConfig().shutdown_grace_seconds + DRAIN_MARGIN_SECONDS
    assert pod["terminationGracePeriodSeconds"] >= grace


def test_the_key_reaches_tunneld_as_a_0600_file_of_its_user() -> None:
    pod = _pod(kubernetes_documents())
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    copy = _container(pod, "tunneld-key")
    source = PurePosixPath(copy["command"][-2])
    assert copy["command"] == ["install", "-m", "0600", str(source), str(DEFAULT_PRIVATE_KEY_FILE)]
    mounts = {mount["mountPath"]: mount["name"] for mount in copy["volumeMounts"]}
    secret = volumes[mounts[str(source.parent)]]["secret"]
    assert secret["defaultMode"] == 0o400
    # With fsGroup the Secret's file is 0440, group fsGroup: readable by the copying user.
    uid, gid = image_user()
    assert pod["securityContext"]["fsGroup"] == gid
    assert copy["securityContext"]["runAsUser"] == uid
    key_volume = mounts[str(DEFAULT_PRIVATE_KEY_FILE.parent)]
    assert volumes[key_volume]["emptyDir"]["medium"] == "Memory"
    tunneld_mounts = {m["mountPath"]: m for m in _container(pod, "tunneld")["volumeMounts"]}
    assert tunneld_mounts[str(DEFAULT_PRIVATE_KEY_FILE.parent)]["name"] == key_volume


def test_a_read_only_root_leaves_tunneld_the_directories_it_writes() -> None:
    pod = _pod(kubernetes_documents())
    writable = {
        PurePosixPath(mount["mountPath"])
        for mount in _container(pod, "tunneld")["volumeMounts"]
        if not mount.get("readOnly", False)
    }
    socket_directory = PurePosixPath(str(SOCKET_DIRECTORY).replace("/var/run/", "/run/"))
    for needed in (PurePosixPath(LOCK_DIRECTORY), socket_directory):
        assert any(needed.is_relative_to(mount) for mount in writable), needed


def test_the_probes_and_the_scrape_use_the_daemons_endpoint(tmp_path: Path) -> None:
    documents = kubernetes_documents()
    pod = _pod(documents)
    tunneld = _container(pod, "tunneld")
    environment = {item["name"]: item["value"] for item in tunneld["env"]}
    config_text = documents["ConfigMap"]["data"]["tunneld.toml"]
    config_file = tmp_path / "tunneld.toml"
    config_file.write_text(config_text)
    config = load_config(config_file, environ=environment)  # every TUNNELD_* name is known
    assert config.interface.private_key.path == DEFAULT_PRIVATE_KEY_FILE  # where the key is put
    listen = config.metrics.listen
    assert listen is not None
    # The kubelet and Prometheus come from outside the pod: not loopback, the default port.
    assert listen.host == "0.0.0.0" and listen.port == DEFAULT_LISTEN.port
    assert _metrics_port(tunneld) == listen.port
    probes = {
        kind: tunneld[kind]["httpGet"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes["readinessProbe"] == {"path": "/readyz", "port": "metrics"}
    assert probes["livenessProbe"] == {"path": "/livez", "port": "metrics"}
    # The app starts only after the sidecar's startup probe passes, and readiness waits for the
    # app (ready_services): startup must ask /livez, or neither would ever start.
    assert config.metrics.ready_services
    assert probes["startupProbe"] == {"path": "/livez", "port": "metrics"}
    startup = tunneld["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60  # generous
    annotations = documents["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(listen.port),
        "prometheus.io/path": "/metrics",
    }


def test_the_configmap_is_mounted_where_tunneld_looks_for_its_file() -> None:
    documents = kubernetes_documents()
    pod = _pod(documents)
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in _container(pod, "tunneld")["volumeMounts"]}
    mount = mounts["/etc/tunneld"]  # the default config path's directory
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["configMap"]["name"] == documents["ConfigMap"]["metadata"]["name"]
    assert "tunneld.toml" in documents["ConfigMap"]["data"]
    assert "TUNNELD_CONFIG" not in {item["name"] for item in _container(pod, "tunneld")["env"]}


def test_the_pod_lets_the_non_root_user_bind_port_80_and_ping_without_capabilities() -> None:
    pod = _pod(kubernetes_documents())
    sysctls = {item["name"]: item["value"] for item in pod["securityContext"]["sysctls"]}
    assert int(sysctls["net.ipv4.ip_unprivileged_port_start"]) <= ProxyConfig().http_port
    low, high = (int(part) for part in sysctls["net.ipv4.ping_group_range"].split())
    _, gid = image_user()
    assert low <= gid <= high


def test_the_podmonitor_scrapes_the_tunneld_container() -> None:
    documents = kubernetes_documents()
    monitor, pod_template = documents["PodMonitor"], documents["Deployment"]["spec"]["template"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_template["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    _metrics_port(_container(pod_template["spec"], "tunneld"))  # the named port exists


def test_each_deploy_directory_has_a_readme() -> None:
    for directory in (DOCKER, KUBERNETES):
        assert (directory / "README.md").is_file(), directory
