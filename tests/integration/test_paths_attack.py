"""Issue 13, break 1, as an attacker ran it: encoded spellings of a guarded path, via the tunnel.

A stock WireGuard gateway, tunneld in the connector's namespace and a stock ``python -m
http.server`` origin (it percent-decodes and resolves ``..`` before opening a file) serving
``admin/secret.txt``. Rules: ``/admin`` behind ``require_header``, then a catch-all for the same
host; and a host whose only rule is ``/v1``. Before paths were normalised, every spelling below
but the plain one answered 200 with the secret.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from tests.integration import netns
from tests.integration.topology import HOST_TUNNEL, Topology, wait_for

pytestmark = pytest.mark.root

SECRET_FILE_TEXT = b"the launch codes are 0000\n"
HEADER_SECRET = "a shared secret for the admin rule"
ORIGIN_PORT = 8090  # inside the connector's own namespace: no clash with other runs

GUARDED = [  # host "files": /admin is guarded, / is not
    "/admin/secret.txt",
    "/%61dmin/secret.txt",
    "/%61%64%6D%69%6E/secret.txt",
    "//admin/secret.txt",
    "///admin//secret.txt",
    "/admin%2fsecret.txt",
    "/admin%2Fsecret.txt",
    "/x/..%2fadmin/secret.txt",
    "/x/%2e%2e/admin/secret.txt",
    "/x/%2E%2E%2Fadmin/secret.txt",
    "/x/../admin/secret.txt",
    "/./admin/secret.txt",
    "/%2e/admin/secret.txt",
    "/admin/./secret.txt",
    "/admin;x/secret.txt",
    "/x/..;/admin/secret.txt",
    "/admin%5csecret.txt",
    "/admin/secret.txt#frag",
    "http://files/%61dmin/secret.txt",
    "http://files//admin/secret.txt",
]
OUTSIDE_V1 = [  # host "api": only /v1 is served
    "/v1/..%2fadmin/secret.txt",
    "/v1/%2e%2e%2fadmin/secret.txt",
    "/v1/%2e%2e/admin/secret.txt",
    "/v1/../admin/secret.txt",
    "/v1//../admin/secret.txt",
    "/v1/..%5cadmin/secret.txt",
    "/v1;/../admin/secret.txt",
]


class Attacked:
    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def get(self, host: str, target: str, headers: str = "") -> tuple[int, bytes]:
        """Send the target byte for byte (no client-side cleaning) and read the whole answer."""
        request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n"
        with netns.connect(self.topology.gateway_ns, HOST_TUNNEL, 80, timeout=10) as sock:
            sock.sendall(request.encode("latin-1"))
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        answer = b"".join(chunks)
        status = int(answer.split(b" ", 2)[1])
        return status, answer.partition(b"\r\n\r\n")[2]


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attacked]:
    workdir = tmp_path_factory.mktemp("paths")
    served = workdir / "www"
    (served / "admin").mkdir(parents=True)
    (served / "admin" / "secret.txt").write_bytes(SECRET_FILE_TEXT)
    (served / "v1").mkdir()
    (served / "v1" / "ok.txt").write_bytes(b"v1 ok\n")
    secret_file = workdir / "admin.secret"
    secret_file.write_text(HEADER_SECRET + "\n")
    secret_file.chmod(0o600)
    topology = Topology(workdir)
    try:
        topology.build()
        topology.start_gateway()
        origin = subprocess.Popen(
            ["ip", "netns", "exec", topology.host_ns, sys.executable, "-m", "http.server",
             "--bind", "127.0.0.1", "--directory", str(served), str(ORIGIN_PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        topology.processes.append(origin)
        wait_for("the http.server origin", lambda: _accepts(topology, ORIGIN_PORT))
        upstream = f"http://127.0.0.1:{ORIGIN_PORT}"
        topology.write_config(
            services=textwrap.dedent(
                f"""
                [[service]]
                name = "admin"
                hosts = ["files"]
                path_prefix = "/admin"
                upstream = "{upstream}"
                [service.require_header]
                name = "X-Admin-Secret"
                value_file = "{secret_file}"

                [[service]]
                name = "files"
                hosts = ["files"]
                upstream = "{upstream}"

                [[service]]
                name = "api"
                hosts = ["api"]
                path_prefix = "/v1"
                upstream = "{upstream}"
                """
            )
        )
        daemon = topology.start_daemon()
        topology.wait_running(daemon)
        topology.wait_handshake()
        yield Attacked(topology)
    finally:
        topology.close()


def _accepts(topology: Topology, port: int) -> bool:
    try:
        netns.connect(topology.host_ns, "127.0.0.1", port, timeout=1).close()
    except OSError:
        return False
    return True


def test_the_plain_paths_work(attacked: Attacked) -> None:
    credential = f"X-Admin-Secret: {HEADER_SECRET}\r\n"
    assert attacked.get("files", "/admin/secret.txt", credential) == (200, SECRET_FILE_TEXT)
    assert attacked.get("files", "/admin/secret.txt")[0] == 401
    assert attacked.get("api", "/v1/ok.txt") == (200, b"v1 ok\n")
    assert attacked.get("api", "/admin/secret.txt")[0] == 404


def test_a_normalised_path_is_what_the_origin_gets(attacked: Attacked) -> None:
    credential = f"X-Admin-Secret: {HEADER_SECRET}\r\n"
    assert attacked.get("files", "/%61dmin//secret.txt", credential) == (200, SECRET_FILE_TEXT)
    assert attacked.get("api", "/%76%31/ok.txt") == (200, b"v1 ok\n")


@pytest.mark.parametrize("target", GUARDED)
def test_no_spelling_of_the_guarded_path_gets_past_the_guard(
    attacked: Attacked, target: str
) -> None:
    status, body = attacked.get("files", target)
    assert SECRET_FILE_TEXT not in body
    assert status in (400, 401, 404), (status, body[:200])


@pytest.mark.parametrize("target", OUTSIDE_V1)
def test_no_spelling_leaves_a_path_prefix(attacked: Attacked, target: str) -> None:
    status, body = attacked.get("api", target)
    assert SECRET_FILE_TEXT not in body
    assert status in (400, 404), (status, body[:200])


def test_the_origin_is_stock_and_decodes(attacked: Attacked) -> None:
    """The premise of the attack: the origin alone serves the secret for an encoded spelling."""
    with netns.connect(attacked.topology.host_ns, "127.0.0.1", ORIGIN_PORT, timeout=5) as sock:
        sock.sendall(b"GET /x/..%2fadmin/secret.txt HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(SECRET_FILE_TEXT)
