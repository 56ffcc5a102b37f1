"""Differential test: tunneld routes tricky paths as nginx does, or refuses them.

nginx (``nginx-light``, its defaults: ``merge_slashes on``, ``ngx_http_parse_complex_uri``) and
tunneld's HTTP proxy get the same prefix rules, both in front of the same recording origins on
127.0.0.1 (one per rule, so where a request went tells which rule took it):

    host files:  /admin  guarded (a header secret; without it: 401)   → origin "admin"
                 /v1                                                   → origin "v1"
                 /       catch-all                                     → origin "root"
    host api:    /v1 only; anything else 404                           → origin "v1"

nginx's ``location /x`` is a string prefix, tunneld's ``path_prefix`` a segment prefix, so nginx
gets ``location = /x`` plus ``location /x/``. Every target of the corpus (a hand list of known
bypass shapes and a derandomised hypothesis sample) is sent, without the secret, to both.

Asserted, for every request:
- tunneld's outcome equals nginx's, or tunneld did not forward it at all (stricter): never does
  tunneld forward a request that nginx refused or sent to another rule (looser = 0);
- what the origin received from tunneld, read the way decoding origins read it (percent-decoded,
  ``\\`` as ``/``, servlet ``;parameters`` cut, dot segments resolved), is never under /admin
  unless it went to the guarded rule, and is under /v1 whenever it went to the v1 rule;
- the origin received the canonical form of the target, query unchanged.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import signal
import socket
import subprocess
import textwrap
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import missing_prerequisite
from tunneld.config_proxy import ProxyConfig, RequireHeader, ServiceConfig, Upstream
from tunneld.proxy.http import HttpProxy
from tunneld.proxy.paths import PathError, normalize_target

LOCAL = "127.0.0.1"
GUARD_SECONDS = 240
HEADER_SECRET = b"sesame"
GENERATED = 500  # hypothesis examples drawn (before removing duplicates)

# -- the corpus -------------------------------------------------------------------------------

HAND_LIST = [
    # plain
    "/", "/admin", "/admin/", "/admin/secret.txt", "/v1", "/v1/", "/v1/x", "/x", "/adminx",
    "/admin.txt", "/v10/x", "/v1x", "/x/admin/secret.txt", "/?/admin", "/x?q=/admin/../",
    # the spellings
    "/%61dmin/secret.txt", "//admin/secret.txt", "/admin%2fsecret.txt", "/x/..%2fadmin/secret.txt",
    "/v1/..%2fadmin/secret.txt", "/v1/%2e%2e%2fadmin/secret.txt",
    # encodings
    "/%41dmin/x", "/%61%64%6d%69%6e/x", "/%61%64%6D%69%6E", "/adm%69n/", "/%2561dmin/x",
    "/admin%2F", "/%2Fadmin/x", "/%2fadmin", "/v1%2f..%2fadmin", "/admin%252fx", "/%76%31/x",
    "/%7e/x", "/%7Eadmin", "/a%c3%a9/x", "/admin/%c3%a9", "/%3f/admin", "/x%3F/admin",
    "/admin%3b/x", "/admin%23/x", "/admin%20/x", "/admin%09/x", "/admin%00/x", "/%00",
    "/admin%0d%0aX:1", "/%7f", "/%zz", "/%", "/%4", "/admin%", "/admin/%g0", "/%%30",
    # dot segments
    "/./admin/x", "/admin/./x", "/x/../admin/x", "/x/%2e%2e/admin/x", "/x/%2E%2e/admin",
    "/x/.%2e/admin/x", "/v1/../admin/x", "/v1/./x", "/v1/..", "/v1/.", "/..", "/../admin",
    "/%2e%2e/admin", "/admin/..", "/admin/../v1/x", "/v1/../../admin", "/.admin/x", "/..admin",
    "/admin../x", "/admin/.../x", "/v1/...", "/.well-known/x", "/v1/.hidden",
    # slashes
    "//", "///", "//admin", "///admin///x", "/admin//x", "//v1//x", "/v1//../admin/x",
    "//..//admin", "/x//..//admin/x",
    # backslashes
    "/admin\\x", "/\\admin", "/x\\..\\admin", "/v1\\..\\admin", "/admin%5cx", "/x/..%5cadmin",
    "/v1/..%5C..%5Cadmin",
    # path parameters
    "/admin;x/secret.txt", "/admin;/x", "/;/admin", "/x/..;/admin/x", "/v1/..;/admin/x",
    "/v1;x/y", "/v1;/../admin", "/login;jsessionid=1", "/v1/a;b=c", "/admin/x;y", "/;",
    "/.;/admin", "/admin;jsessionid=x",
    # case
    "/ADMIN/x", "/Admin/x", "/aDmin", "/V1/x", "/%41DMIN",
    # fragments and queries
    "/admin#x", "/x#/../admin", "/x?#", "/x?a=%2f#b", "/v1?x=/admin", "/admin?x", "/v1?",
    # odd but legal characters
    "/admin:x", "/admin@x", "/admin+x", "/admin!x", "/admin$x", "/admin'x", "/admin(x)",
    "/admin*x", "/admin,x", "/admin=x", "/admin|x", "/admin{x}", "/admin^x", "/admin`x",
    "/admin\"x", "/admin<x>",
    # absolute form
    "http://files/admin/x", "http://files/%61dmin/x", "http://files//admin/x",
    "http://files/x/..%2fadmin", "http://files", "http://api/v1/x", "http://api/%76%31/x",
    "http://files/admin#x", "HTTP://files/%61dmin",
    # very long paths (OPTIONS * is no path: see docs/configuration.md)
    "/v1/" + "a/" * 1000, "/" + "%61" * 2000, "/admin" + "/" * 3000 + "x",
]  # fmt: skip

PIECES = [
    "/", "//", "admin", "ADMIN", "adm", "in", "%61", "%41", "%64", "%6d", "%6D", "%69", "%6e",
    "v1", "V1", "%76", "%31", "secret.txt", "x", ".", "..", "...", "%2e", "%2E", "%2f", "%2F",
    "%5c", "\\", ";", ";x", "%3b", "%00", "%0a", "%25", "%2561", "%zz", "%", "#", "?", "~",
    "%7e", "%c3%a9", "%20", "+", "@", ":", "=",
]  # fmt: skip


def generated_targets() -> list[str]:
    """A reproducible sample: hypothesis with a fixed seed (derandomize) and no database."""
    drawn: list[str] = []

    @settings(
        max_examples=GENERATED,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=10))
    def draw(pieces: list[str]) -> None:
        drawn.append("/" + "".join(pieces))

    draw()
    return drawn


def corpus() -> list[str]:
    return list(dict.fromkeys([*HAND_LIST, *generated_targets()]))


# -- what an origin makes of a path ------------------------------------------------------------


def origin_view(target: str) -> str:
    """The path a lenient decoding origin serves for ``target``: the union of their habits."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    path = urllib.parse.unquote(path, errors="surrogateescape").replace("\\", "/")
    path = "/".join(segment.partition(";")[0] for segment in path.split("/"))
    return posixpath.normpath("/" + path.lstrip("/"))  # normpath keeps a leading "//"


def under(prefix: str, path: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


# -- the recording origins -------------------------------------------------------------------


@dataclass
class Recorder:
    """Origins that answer 200 with their label and keep the target of each request."""

    seen: list[tuple[str, str]] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    async def serve(self, label: str, stream: trio.SocketStream) -> None:
        head = b""
        with trio.move_on_after(10):
            while b"\r\n\r\n" not in head and len(head) < 1 << 20:
                data = await stream.receive_some(65536)
                if not data:
                    break
                head += data
        line = head.split(b"\r\n", 1)[0].split(b" ")
        if len(line) == 3:
            self.seen.append((label, line[1].decode("latin-1")))
        body = label.encode()
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        with suppress(trio.BrokenResourceError):
            await stream.send_all(answer + body)
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def recording_origins() -> AsyncIterator[Recorder]:
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        for label in ("admin", "v1", "root"):
            listeners = await nursery.start(
                partial(trio.serve_tcp, partial(recorder.serve, label), 0, host=LOCAL)
            )
            recorder.ports[label] = listeners[0].socket.getsockname()[1]
        yield recorder
        nursery.cancel_scope.cancel()


# -- the two proxies -------------------------------------------------------------------------


def services(ports: dict[str, int]) -> list[ServiceConfig]:
    def upstream(label: str) -> Upstream:
        return Upstream("http", LOCAL, ports[label])

    guard = RequireHeader("x-admin-secret", Path("/unused"))
    return [
        ServiceConfig("admin", upstream("admin"), hosts=("files",), path_prefix="/admin",
                      require_header=guard),
        ServiceConfig("v1", upstream("v1"), hosts=("files", "api"), path_prefix="/v1"),
        ServiceConfig("root", upstream("root"), hosts=("files",)),
    ]  # fmt: skip


@asynccontextmanager
async def tunneld_proxy(ports: dict[str, int]) -> AsyncIterator[int]:
    proxy = HttpProxy(
        services(ports),
        ProxyConfig(max_request_head_bytes=65536),
        secrets={"admin": HEADER_SECRET},
    )

    async def handle(stream: trio.SocketStream) -> None:
        await proxy.handle(stream, LOCAL)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host=LOCAL))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()
    await proxy.aclose()


def nginx_config(workdir: Path, port: int, ports: dict[str, int]) -> str:
    def to(label: str) -> str:
        return f"proxy_pass http://{LOCAL}:{ports[label]};"

    guarded = (
        f'if ($http_x_admin_secret != "{HEADER_SECRET.decode()}") {{ return 401; }} {to("admin")}'
    )
    user = "user nobody nogroup;" if os.geteuid() == 0 else ""
    return textwrap.dedent(
        f"""\
        {user}
        worker_processes 1;
        daemon off;
        pid {workdir}/nginx.pid;
        error_log {workdir}/error.log;
        events {{ worker_connections 64; }}
        http {{
            access_log off;
            client_body_temp_path {workdir}/body;
            proxy_temp_path {workdir}/proxy;
            fastcgi_temp_path {workdir}/fastcgi;
            uwsgi_temp_path {workdir}/uwsgi;
            scgi_temp_path {workdir}/scgi;
            large_client_header_buffers 4 64k;
            server {{
                listen {LOCAL}:{port};
                server_name files;
                location = /admin {{ {guarded} }}
                location /admin/ {{ {guarded} }}
                location = /v1 {{ {to("v1")} }}
                location /v1/ {{ {to("v1")} }}
                location / {{ {to("root")} }}
            }}
            server {{
                listen {LOCAL}:{port};
                server_name api;
                location = /v1 {{ {to("v1")} }}
                location /v1/ {{ {to("v1")} }}
                location / {{ return 404; }}
            }}
        }}
        """
    )


@pytest.fixture
def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
    if found is None:
        missing_prerequisite("nginx (scripts/bootstrap installs the Debian package nginx-light)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def nginx(binary: str, workdir: Path, ports: dict[str, int]) -> AsyncIterator[int]:
    port = free_port()
    (workdir / "nginx.conf").write_text(nginx_config(workdir, port, ports))
    argv = [binary, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", "nginx.conf"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(10):
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"nginx exited: {process.stderr.read()!r}")  # type: ignore[union-attr]
                try:
                    await (await trio.open_tcp_stream(LOCAL, port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
        yield port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


# -- requests and outcomes -------------------------------------------------------------------


async def fetch(port: int, method: str, target: str, host: str) -> int:
    """Send one request byte for byte on a new connection; the status (0: no answer)."""
    request = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    stream = await trio.open_tcp_stream(LOCAL, port)
    answer = b""
    try:
        await stream.send_all(request.encode("latin-1", "surrogateescape"))
        with trio.move_on_after(10):
            while data := await stream.receive_some(65536):
                answer += data
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0


@dataclass(frozen=True)
class Outcome:
    status: int
    origin: str | None  # the origin that got the request (its rule), if any
    received: str | None  # the target it received

    @property
    def decision(self) -> str:
        return self.origin if self.origin is not None else str(self.status)


async def outcome(recorder: Recorder, port: int, method: str, target: str, host: str) -> Outcome:
    before = len(recorder.seen)
    status = await fetch(port, method, target, host)
    seen = recorder.seen[before:]
    assert len(seen) <= 1, seen
    if not seen:
        return Outcome(status, None, None)
    return Outcome(status, *seen[0])


def expected_forward(target: str) -> str:
    """What tunneld must send on: the canonical target, in origin-form."""
    if not target.startswith("/"):
        rest = target.split("://", 1)[1]
        slash = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
        target = rest[min(slash) :] if slash else "/"
        if target.startswith("?"):
            target = "/" + target
    return normalize_target(target.encode("latin-1")).decode("latin-1")


# -- the test --------------------------------------------------------------------------------


async def test_tunneld_routes_like_nginx_or_stricter(nginx_binary: str, tmp_path: Path) -> None:
    targets = corpus()
    assert len(targets) >= 500
    tally: Counter[str] = Counter()
    kinds: Counter[tuple[str, str]] = Counter()
    looser: list[str] = []
    examples: list[str] = []
    unsafe: list[str] = []
    with trio.fail_after(GUARD_SECONDS):
        async with (
            recording_origins() as recorder,
            tunneld_proxy(recorder.ports) as ours,
            nginx(nginx_binary, tmp_path, recorder.ports) as theirs,
        ):
            if True:
                cases = [("GET", t, h) for t in targets for h in ("files", "api")]
                for method, target, host in cases:
                    reference = await outcome(recorder, theirs, method, target, host)
                    result = await outcome(recorder, ours, method, target, host)
                    case = f"{method} {target[:80]!r} Host: {host}"
                    if result.decision == reference.decision:
                        tally["same"] += 1
                    elif result.origin is None:
                        tally["stricter"] += 1
                        kind = (reference.decision, result.decision)
                        kinds[kind] += 1
                        if kinds[kind] <= 3:
                            examples.append(f"{kind[0]}→{kind[1]}: {case}")
                    else:
                        tally["looser"] += 1
                        looser.append(f"{case}: nginx {reference}, tunneld {result}")
                    problem = (
                        None if result.origin is None else forwarding_problem(target, host, result)
                    )
                    if problem is not None:
                        unsafe.append(f"{case}: {problem}")
    print(f"\ncorpus: {len(targets)} targets, {len(cases)} requests to each proxy")
    print(f"agreement: {dict(tally)}")
    print(
        "stricter (nginx → tunneld): " + ", ".join(f"{a}→{b}: {n}" for (a, b), n in kinds.items())
    )
    print("examples:\n  " + "\n  ".join(examples))
    print(f"looser: {len(looser)}\n  " + "\n  ".join(looser[:20]))
    print(f"unsafe forwards: {len(unsafe)}\n  " + "\n  ".join(unsafe[:20]))
    assert not looser, "\n".join(looser[:20])
    assert not unsafe, "\n".join(unsafe[:20])
    assert tally["same"] > len(cases) // 2  # a sanity check that both were routing at all


def forwarding_problem(target: str, host: str, result: Outcome) -> str | None:
    """What is wrong with what tunneld forwarded, or ``None``."""
    assert result.received is not None
    view = origin_view(result.received)
    if result.origin != "admin" and under("/admin", view):
        return f"reached the origin as {view!r} unguarded"
    if result.origin == "v1" and not under("/v1", view):
        return f"the v1 rule sent {view!r} to its origin"
    if not target.startswith("/"):  # absolute form: its authority is the host routed by
        host = target.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
    if host == "api" and result.origin != "v1":
        return f"host api reached the {result.origin} rule"
    try:
        expected = expected_forward(target)
    except PathError:
        return f"forwarded as {result.received!r} although it is not canonical"
    if result.received != expected:
        return f"forwarded as {result.received!r}, not as {expected!r}"
    return None


def test_origin_view() -> None:
    assert origin_view("/x/..%2fadmin/secret.txt") == "/admin/secret.txt"
    assert origin_view("/admin;x/y?q") == "/admin/y"
    assert origin_view("/v1\\..\\admin") == "/admin"
    assert origin_view("//%61dmin#x") == "/admin"


def test_the_corpus_is_reproducible() -> None:
    assert corpus() == corpus()
