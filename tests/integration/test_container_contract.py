"""The container contract, run on this host: tunneld as the image and compose.yaml run it.

No container engine runs here, so this test gives tunneld what a runtime would give the image,
taking each setting from the image's own files, and runs the sidecar for real:

=============================================  ================================================
a container runtime gives                      here
=============================================  ================================================
the app's network namespace, shared            Topology's host namespace, with the app on
(``network_mode: service:app``)                127.0.0.1:8080 in it
that namespace's sysctls (compose.yaml, app)   the same, set with ``sysctl``
the image's user; ``cap_drop: ALL``,           ``setpriv``: the Dockerfile's USER, a bounding
``cap_add: NET_ADMIN``; no-new-privileges      set of exactly compose's ``cap_add``, nothing
                                               inheritable or ambient (runtimes give a non-root
                                               user no ambient capabilities), ``no_new_privs``,
                                               the entrypoint executed directly, as runc does
the image's file capabilities                  the Dockerfile's ``setcap`` on copies of this
                                               interpreter (as a virtualenv) and of wireguard-go
``read_only``, the ``/run`` tmpfs, the key     a mount namespace: ``/`` remounted read-only, a
volume                                         tmpfs on ``/run`` with compose's options, the
                                               volume at /var/lib/tunneld
``devices: /dev/net/tun``: a node the          the same, on a tmpfs at /dev/net: the host's
runtime makes with the host's device number,   device number, and the mode of a host that runs
mode and owner                                 udev, 0666 (see below)
compose's ``environment``, no config file      the same variables, with the gateway's key and
                                               endpoint filled in
``HEALTHCHECK tunneld ready`` (an exec)        ``nsenter`` into the daemon's namespaces, with the
                                               same user, capabilities and environment
=============================================  ================================================

The first start creates the key in the empty volume and logs its public key; the gateway is then
configured with it, as an operator would, and a request from the gateway's namespace crosses the
tunnel to the app. The daemon's capabilities are read from /proc/PID/status; SIGTERM drains.

The tun device's mode is the container's, never this machine's. The kernel creates /dev/net/tun
``crw-------`` root; udev (``50-udev-default.rules``) or systemd-tmpfiles
(``static-nodes-permissions.conf``) make it 0666 where they run. A machine without udev (a
microVM, as CI's) keeps 0600 until a package install runs them, and runc copies the host's mode
into the container, where the image's user cannot open it: that host is a test of its own, in
which ``tunneld run`` must say what to do and stop.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing_prerequisite
from tests.integration import netns
from tests.integration.topology import (
    GATEWAY_PORT,
    GATEWAY_UNDERLAY,
    HOST_TUNNEL,
    Topology,
    run,
    wait_for,
)
from tests.unit.test_deploy_manifests import file_capabilities, image_user, load_compose
from tunneld.config import DEFAULT_PRIVATE_KEY_FILE
from tunneld.keys import encode_key, generate_private_key, load_key_file, public_key

pytestmark = pytest.mark.root

CAP_NET_ADMIN = 1 << 12
APP_PORT = 8080
STATUS_FIELDS = frozenset(
    ["Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"]
)
IMAGE_HOME = Path("/opt/tunneld")  # the image's virtualenv (Dockerfile); mirrored in a temp dir
APP = textwrap.dedent(
    """
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"hello from the app, to {self.client_address[0]}\\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", PORT), Handler)
    print("listening", flush=True)
    server.serve_forever()
    """
)


@pytest.fixture(autouse=True)
def _tools() -> None:
    """setcap (libcap2-bin), nsenter and unshare (util-linux): skipped without, failed in CI."""
    missing = [
        tool for tool in ("setcap", "getcap", "nsenter", "unshare") if not shutil.which(tool)
    ]
    if missing:
        missing_prerequisite(f"missing {', '.join(missing)} (Debian: libcap2-bin util-linux)")


# -- the image, mirrored -------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """The image's files that matter, laid out under ``root``."""

    root: Path
    home: Path  # the virtualenv, IMAGE_HOME's mirror
    entrypoint: Path  # home/bin/tunneld, the ENTRYPOINT
    interpreter: Path  # home/bin/python, what the entrypoint's #! names
    wireguard_go: Path
    volume: Path  # the key volume's content (compose: tunneld-key)
    uid: int
    gid: int

    @property
    def path(self) -> str:
        return f"{self.home / 'bin'}:{self.wireguard_go.parent}:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture
def image() -> Iterator[Image]:
    # Not under pytest's tmp_path: that is root's alone (0700), and the image's user must enter.
    root = Path(tempfile.mkdtemp(prefix="tdimage-", dir="/tmp"))
    try:
        root.chmod(0o755)
        yield _build_image(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _build_image(root: Path) -> Image:
    """A virtualenv like the Dockerfile's (its own interpreter binary, this one's packages), and
    wireguard-go, each with the Dockerfile's file capabilities."""
    uid, gid = image_user()
    capabilities = file_capabilities()
    home = root / IMAGE_HOME.relative_to("/")
    (home / "bin").mkdir(parents=True)
    interpreter = home / "bin" / "python"
    shutil.copy2(Path(sys.executable).resolve(), interpreter)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (home / "pyvenv.cfg").write_text(
        f"home = {Path(sys.executable).resolve().parent}\ninclude-system-site-packages = false\n"
    )
    (home / "lib" / version).mkdir(parents=True)
    # This virtualenv's packages, tunneld among them (installed editable: it finds this checkout).
    (home / "lib" / version / "site-packages").symlink_to(
        Path(sysconfig.get_paths()["purelib"]).resolve()
    )
    entrypoint = home / "bin" / "tunneld"  # what pip writes for the console script
    entrypoint.write_text(
        f"#!{interpreter}\nimport sys\nfrom tunneld.cli import main\nsys.exit(main())\n"
    )
    entrypoint.chmod(0o755)
    wireguard_go = root / "usr" / "bin" / "wireguard-go"
    wireguard_go.parent.mkdir(parents=True)
    shutil.copy2(Path(shutil.which("wireguard-go") or "wireguard-go").resolve(), wireguard_go)
    run("setcap", capabilities["$interpreter"], str(interpreter))
    run("setcap", capabilities["/usr/bin/wireguard-go"], str(wireguard_go))
    for path in (interpreter, wireguard_go):
        if "cap_net_admin" not in run("getcap", str(path)):
            missing_prerequisite(
                f"{root}: this file system keeps no file capabilities (security.* xattrs)"
            )
    volume = root / "volume"  # a new, empty named volume: Docker copies the image's directory
    volume.mkdir(mode=0o700)
    os.chown(volume, uid, gid)
    return Image(root, home, entrypoint, interpreter, wireguard_go, volume, uid, gid)


# -- the container, as a runtime makes it ----------------------------------------------------------


def _blocked_ancestor(path: Path) -> Path | None:
    """The first directory on the way to ``path`` that others may not enter (e.g. /root)."""
    current = Path("/")
    for part in path.parts[1:]:
        current = current / part
        if current.is_dir() and not current.stat().st_mode & stat.S_IXOTH:
            return current
    return None


def _filesystem_script(image: Image, tunneld: dict[str, Any], tun_mode: int = 0o666) -> str:
    """Root's set-up inside the new mount namespace, before it executes ``"$@"``.

    ``tun_mode``: the mode of the host's /dev/net/tun, which the runtime copies (0666 where udev
    runs, the kernel's 0600 where nothing changed it)."""
    lines = ["set -eu"]
    # This machine's interpreter may live where only root can go (pyenv under /root). An image
    # has its interpreter in the open: show the needed directory alone, in the open.
    needed = {
        Path(sys.base_prefix).resolve(),
        Path(sysconfig.get_paths()["purelib"]).resolve(),
        Path(__file__).resolve().parents[2],  # this checkout: the editable install's tunneld
    }
    needed = {
        path for path in needed if not any(path.is_relative_to(o) and path != o for o in needed)
    }
    hidden = {path: blocked for path in sorted(needed) if (blocked := _blocked_ancestor(path))}
    for index, path in enumerate(hidden):
        stage = image.root / "stage" / str(index)
        stage.mkdir(parents=True, exist_ok=True)
        lines.append(f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(stage))}")
    for blocked in sorted(set(hidden.values())):
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(blocked))}")
    for index, path in enumerate(hidden):
        stage = image.root / "stage" / str(index)
        lines.append(f"mkdir -p {shlex.quote(str(path))}")
        lines.append(f"mount --move {shlex.quote(str(stage))} {shlex.quote(str(path))}")
    # compose: tmpfs on /run with its options; the key volume; read_only: true.
    (tmpfs,) = tunneld["tmpfs"]
    target, _, options = tmpfs.partition(":")
    lines.append(f"mount -t tmpfs -o {shlex.quote(options)} tmpfs {shlex.quote(target)}")
    (volume,) = tunneld["volumes"]
    volume_target = volume.partition(":")[2]
    assert Path(volume_target) == DEFAULT_PRIVATE_KEY_FILE.parent
    # /var/lib/tunneld does not exist on this host: a tmpfs on /var/lib holds the mount point.
    lines.append(
        f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(Path(volume_target).parent))}"
    )
    lines.append(f"mkdir {shlex.quote(volume_target)}")
    lines.append(f"mount --bind {shlex.quote(str(image.volume))} {shlex.quote(volume_target)}")
    # devices: runc mknods the device in the container's /dev with the host's number, mode and
    # owner (libcontainer's DeviceFromPath); here a tmpfs on /dev/net holds it, root's.
    (device,) = tunneld["devices"]
    host_device, _, device_target = device.partition(":")
    number = Path(host_device).stat().st_rdev
    lines.append(
        f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(Path(device_target).parent))}"
    )
    major, minor = os.major(number), os.minor(number)
    lines.append(f"mknod -m {tun_mode:o} {shlex.quote(device_target)} c {major} {minor}")
    if tunneld["read_only"]:
        lines.append("mount -o remount,bind,ro /")
    lines.append('exec "$@"')
    return "\n".join(lines)


def _as_the_image_user(image: Image, tunneld: dict[str, Any], *command: str) -> list[str]:
    """``setpriv`` with what runc gives the image's process: the user, exactly cap_add in the
    bounding set, nothing inheritable or ambient, no_new_privs; the command executed directly."""
    assert tunneld["cap_drop"] == ["ALL"]
    bounding = ",".join(["-all", *(f"+{name.lower()}" for name in tunneld["cap_add"])])
    no_new_privs = ["--no-new-privs"] if "no-new-privileges:true" in tunneld["security_opt"] else []
    return [
        "setpriv", f"--reuid={image.uid}", f"--regid={image.gid}", "--clear-groups",
        "--inh-caps=-all", f"--bounding-set={bounding}", *no_new_privs, "--", *command,
    ]  # fmt: skip


def _environment(image: Image, tunneld: dict[str, Any]) -> dict[str, str]:
    """The container's environment: the Dockerfile's ENV and compose's (and debug logs)."""
    environment = {
        "PATH": image.path,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "TUNNELD_LOG_LEVEL": "debug",
    }
    environment.update(tunneld["environment"])
    return environment


def _capabilities(pid: int) -> dict[str, str]:
    """The identity and capability lines of /proc/PID/status."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = (line.partition(":") for line in lines)
    return {key: value.strip() for key, _, value in fields if key in STATUS_FIELDS}


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, from their own PPid. (Not ``task/*/children``:
    proc(5) calls it reliable only for stopped or frozen children, and trio spawns from a worker
    thread, so the child moves to another thread's list when that thread exits.)"""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("PPid:"):
                    if int(line.split()[1]) == pid:
                        found.append(int(entry.name))
                    break
    return found


def _container_diagnostics(pid: int, image: Image) -> str:
    """What decides whether wireguard-go gets its tun device, as the container sees it: for a
    failure message, next to tunneld's log."""
    lines = ["-- the container, as seen from the host:"]
    try:
        info = Path(f"/proc/{pid}/root/dev/net/tun").stat()  # in the daemon's mount namespace
        mode, number = stat.filemode(info.st_mode), info.st_rdev
        device = f"{mode} {info.st_uid}:{info.st_gid} {os.major(number)},{os.minor(number)}"
    except OSError as exc:
        device = exc.strerror or str(exc)
    lines.append(f"/dev/net/tun: {device}")
    for path in (image.interpreter, image.wireguard_go):
        capabilities = run("getcap", str(path), check=False).strip()
        lines.append(capabilities or f"{path}: no file capabilities")
    for process in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            exe = Path(f"/proc/{process}/exe").resolve().name
            lines.append(f"pid {process} ({exe}): {_capabilities(process)}")
    return "\n".join(lines)


def _root_mount_options(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return fields[5].split(",")
    raise AssertionError(f"no / in /proc/{pid}/mountinfo")


def _expected_capabilities(image: Image) -> dict[str, str]:
    ids = "\t".join([str(image.uid)] * 4)
    gids = "\t".join([str(image.gid)] * 4)
    only_net_admin = f"{CAP_NET_ADMIN:016x}"
    return {
        "Uid": ids,
        "Gid": gids,
        "Groups": "",
        "CapInh": f"{0:016x}",
        "CapPrm": only_net_admin,
        "CapEff": only_net_admin,
        "CapBnd": only_net_admin,
        "CapAmb": f"{0:016x}",
        "NoNewPrivs": "1",
    }


# -- the tests -----------------------------------------------------------------------------------


def test_the_sidecar_serves_the_app_through_the_tunnel_as_a_non_root_user_with_net_admin_only(
    tmp_path: Path, image: Image
) -> None:
    topology = Topology(tmp_path)
    app: subprocess.Popen[bytes] | None = None
    try:
        topology.build()
        compose = load_compose(
            {
                "TUNNELD_GATEWAY_PUBLIC_KEY": topology.gateway_public_key,
                "TUNNELD_GATEWAY_ENDPOINT": f"{GATEWAY_UNDERLAY}:{GATEWAY_PORT}",
            }
        )
        tunneld, app_service = compose["services"]["tunneld"], compose["services"]["app"]
        assert (
            tunneld["environment"]["TUNNELD_SERVICE_0_UPSTREAM"] == f"http://127.0.0.1:{APP_PORT}"
        )
        ns = topology.host_ns  # the app's namespace, which tunneld joins
        for name, value in app_service["sysctls"].items():
            run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{name}={value}")
        app = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", APP.replace("PORT", str(APP_PORT))],
            stdout=subprocess.PIPE,
        )
        assert app.stdout is not None and app.stdout.readline().strip() == b"listening"

        log_path = tmp_path / "tunneld.log"
        with log_path.open("ab") as log_file:
            daemon = subprocess.Popen(
                [
                    "ip", "netns", "exec", ns, "sh", "-c", _filesystem_script(image, tunneld), "sh",
                    *_as_the_image_user(image, tunneld, str(image.entrypoint), "run"),
                ],
                stdout=log_file, stderr=subprocess.STDOUT, env=_environment(image, tunneld),
            )  # fmt: skip
        topology.processes.append(daemon)  # stopped in close() if the test fails early

        def daemon_log() -> str:
            return log_path.read_text(errors="replace")

        def explain() -> str:
            return f"{daemon_log()}\n{_container_diagnostics(daemon.pid, image)}"

        def logged_public_key() -> str | None:
            if daemon.poll() is not None:
                raise AssertionError(f"tunneld exited with {daemon.returncode}:\n{daemon_log()}")
            match = re.search(r"public key ([A-Za-z0-9+/]{43}=)", daemon_log())
            return match[1] if match else None

        # First start: the key is created in the empty volume; its public key is in the log.
        connector_key = wait_for(
            "the public key in the log", logged_public_key, timeout=30, explain=explain
        )
        key_file = image.volume / DEFAULT_PRIVATE_KEY_FILE.name
        info = key_file.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (
            image.uid,
            image.gid,
            0o600,
        )
        assert encode_key(public_key(load_key_file(key_file))) == connector_key

        # The operator configures the gateway with it.
        topology.host_public_key = connector_key
        topology.start_gateway()

        # What runs is the image's interpreter, as the image's user, with NET_ADMIN alone —
        # effective only because tunneld raised its permitted file capability.
        assert Path(f"/proc/{daemon.pid}/exe").resolve() == image.interpreter
        expected = _expected_capabilities(image)
        assert _capabilities(daemon.pid) == expected
        assert "ro" in _root_mount_options(daemon.pid)

        def wireguard_go_child() -> int | None:
            # The key is logged before the device is opened: the child may not exist yet.
            children = [
                child
                for child in _children(daemon.pid)
                if Path(f"/proc/{child}/exe").resolve() == image.wireguard_go
            ]
            assert len(children) <= 1, children
            return children[0] if children else None

        wireguard_go = wait_for(
            "wireguard-go to run as tunneld's child", wireguard_go_child, 30, explain=explain
        )
        assert _capabilities(wireguard_go) == expected  # its own file capability, =ep

        # HEALTHCHECK: `tunneld ready` executed in the container (same namespaces, user, caps).
        def healthy() -> bool:
            result = subprocess.run(
                [
                    "nsenter", f"--target={daemon.pid}", "--mount", "--net", "--",
                    *_as_the_image_user(image, tunneld, str(image.entrypoint), "ready"),
                ],
                capture_output=True, text=True, timeout=30, check=False,
                env=_environment(image, tunneld),
            )  # fmt: skip
            if daemon.poll() is not None:
                raise AssertionError(f"tunneld exited with {daemon.returncode}:\n{daemon_log()}")
            return result.returncode == 0 and result.stdout.strip() == "ready"

        wait_for("the health check to pass", healthy, timeout=60, explain=explain)

        # A request from the gateway crosses the tunnel to the app on 127.0.0.1, on port 80.
        connection = netns.HTTPConnection(topology.gateway_ns, HOST_TUNNEL, 80)
        try:
            connection.request("GET", "/", headers={"Host": "billing"})
            response = connection.getresponse()
            body = response.read().decode()
        finally:
            connection.close()
        assert response.status == 200, body
        assert body == "hello from the app, to 127.0.0.1\n"

        # docker stop: SIGTERM, a drain, the interface torn down, exit 0.
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=45) == 0, daemon_log()
        log = daemon_log()
        assert "received SIGTERM; draining" in log and "tunneld stopped" in log
        links = run("ip", "-n", ns, "-o", "link", "show")
        assert tunneld["environment"].get("TUNNELD_INTERFACE_NAME", "tunneld0") not in links
        assert not Path(f"/proc/{wireguard_go}").exists()
    finally:
        topology.close()
        if app is not None:
            app.kill()
            app.wait(timeout=10)
            assert app.stdout is not None
            app.stdout.close()


def test_without_net_admin_from_the_runtime_the_image_still_runs_and_run_says_what_is_missing(
    tmp_path: Path, image: Image
) -> None:
    """Permitted-only file capabilities never block an exec: `genkey` works anywhere, and `run`
    explains itself (exit 2) instead of the kernel refusing to start the interpreter."""
    compose = load_compose(
        {"TUNNELD_GATEWAY_PUBLIC_KEY": encode_key(public_key(generate_private_key()))}
    )
    tunneld = {**compose["services"]["tunneld"], "cap_add": []}  # docker run --cap-drop ALL
    environment = _environment(image, tunneld)

    def container(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "unshare", "--net", "--mount", "--", "sh", "-c", _filesystem_script(image, tunneld),
                "sh", *_as_the_image_user(image, tunneld, str(image.entrypoint), *command),
            ],
            capture_output=True, text=True, timeout=60, check=False, env=environment,
        )  # fmt: skip

    genkey = container("genkey")
    assert genkey.returncode == 0, genkey.stderr
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=\n", genkey.stdout)
    daemon = container("run")
    assert daemon.returncode == 2, daemon.stdout + daemon.stderr
    assert "tunneld needs CAP_NET_ADMIN" in daemon.stderr
    assert "--cap-add NET_ADMIN" in daemon.stderr
    assert not any(image.volume.iterdir())  # it stopped before creating a key


def test_on_a_host_whose_tun_device_only_root_may_open_run_says_so_and_stops(
    image: Image,
) -> None:
    """A host without udev keeps the kernel's /dev/net/tun, ``crw-------`` root, and the runtime
    copies that mode: the image's user cannot open it (EACCES), so wireguard-go never starts.
    That is for a person to fix: `run` says what to do and stops (exit 2) instead of rebuilding
    the interface for ever."""
    compose = load_compose(
        {
            "TUNNELD_GATEWAY_PUBLIC_KEY": encode_key(public_key(generate_private_key())),
            "TUNNELD_GATEWAY_ENDPOINT": "127.0.0.1:51820",  # nothing is sent: no device
        }
    )
    tunneld, app_service = compose["services"]["tunneld"], compose["services"]["app"]
    # userspace: "auto" takes the kernel's WireGuard where there is one, with no tun device.
    environment = {**_environment(image, tunneld), "TUNNELD_INTERFACE_BACKEND": "userspace"}
    # A namespace of its own, set up as the app's is (compose's sysctls), so that tunneld gets as
    # far as the device.
    namespace = ["set -eu", "ip link set lo up"]
    namespace += [
        f"sysctl -q -w {name}={shlex.quote(str(value))}"
        for name, value in app_service["sysctls"].items()
    ]
    script = "\n".join([*namespace, _filesystem_script(image, tunneld, tun_mode=0o600)])
    result = subprocess.run(
        [
            "unshare", "--net", "--mount", "--", "sh", "-c", script,
            "sh", *_as_the_image_user(image, tunneld, str(image.entrypoint), "run"),
        ],
        capture_output=True, text=True, timeout=30, check=False, env=environment,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert f"uid {image.uid} cannot open /dev/net/tun (crw------- 0:0)" in result.stderr, output
    assert "chmod 0666 /dev/net/tun" in result.stderr, output
    assert "rebuilding" not in output
