"""A two-namespace WireGuard topology built from real parts, for integration tests.

    gateway netns "tdgw-XXXX"                       host netns "tdhost-XXXX"
    stock wireguard-go + `wg set`  ── veth ──       tunneld run (userspace backend)
    underlay 198.18.0.1/24                          underlay 198.18.0.2/24
    tunnel   10.44.0.1/24                           tunnel   10.44.0.2/24

198.18.0.0/15 is the benchmarking range: it exists only inside these namespaces. Names are unique
per topology because wireguard-go's UAPI socket directory (/var/run/wireguard) is shared by all
namespaces. Everything is torn down in ``close`` — processes first, then namespaces — and the
fixture calls it in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GATEWAY_UNDERLAY = "198.18.0.1"
HOST_UNDERLAY = "198.18.0.2"
GATEWAY_TUNNEL = "10.44.0.1"
HOST_TUNNEL = "10.44.0.2"
GATEWAY_PORT = 51820


def run(*argv: str, check: bool = True, input_text: str | None = None) -> str:
    result = subprocess.run(
        argv, capture_output=True, text=True, input=input_text, timeout=30, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def wait_for(
    what: str,
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    explain: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something true; on timeout, fail with ``what`` and
    what ``explain`` says (e.g. the daemon's log)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            message = f"timed out after {timeout:g}s waiting for {what}"
            if explain is not None:
                message += f"\n{explain()}"
            raise AssertionError(message)
        time.sleep(0.1)


class Topology:
    def __init__(self, workdir: Path) -> None:
        self.suffix = secrets.token_hex(3)
        self.workdir = workdir
        self.gateway_ns = f"tdgw-{self.suffix}"
        self.host_ns = f"tdhost-{self.suffix}"
        self.gateway_ifname = f"tdg{self.suffix}"
        self.host_ifname = f"tdh{self.suffix}"  # the connector's interface
        self.processes: list[subprocess.Popen[bytes]] = []
        self.gateway_private_key = ""
        self.gateway_public_key = ""
        self.host_public_key = ""
        self.key_file = workdir / "private.key"
        self.config_file = workdir / "tunneld.toml"
        self.hosts_file = Path("/etc/netns") / self.host_ns / "hosts"
        self.extra_gateways: list[ExtraGateway] = []  # add_gateway

    # -- set-up -----------------------------------------------------------------------------

    def build(self) -> None:
        for ns in (self.gateway_ns, self.host_ns):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        # `ip netns exec` bind-mounts this over /etc/hosts, so tests can change what a name
        # resolves to.
        self.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        self.hosts_file.write_text("127.0.0.1 localhost\n")
        run(
            "ip", "link", "add", f"vg{self.suffix}", "netns", self.gateway_ns,
            "type", "veth", "peer", "name", f"vh{self.suffix}", "netns", self.host_ns,
        )  # fmt: skip
        for ns, link, address in (
            (self.gateway_ns, f"vg{self.suffix}", GATEWAY_UNDERLAY),
            (self.host_ns, f"vh{self.suffix}", HOST_UNDERLAY),
        ):
            run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", link)
            run("ip", "-n", ns, "link", "set", link, "up")
        # The connector's key comes from `wg genkey` (interop: a stock key works as ours), the
        # gateway's from `tunneld genkey` (interop the other way).
        host_private = run("wg", "genkey")
        self.key_file.write_text(host_private)
        self.key_file.chmod(0o600)
        self.host_public_key = run("wg", "pubkey", input_text=host_private).strip()
        self.gateway_private_key = self.tunneld("genkey").stdout.strip()
        self.gateway_public_key = run("wg", "pubkey", input_text=self.gateway_private_key).strip()

    def start_gateway(self) -> None:
        """A stock WireGuard peer: wireguard-go configured by `wg set`, as wg-quick would."""
        ns = self.gateway_ns
        run("ip", "netns", "exec", ns, "wireguard-go", self.gateway_ifname)
        gateway_key = self.workdir / "gateway.key"
        gateway_key.write_text(self.gateway_private_key + "\n")
        gateway_key.chmod(0o600)
        run(
            "ip", "netns", "exec", ns, "wg", "set", self.gateway_ifname,
            "private-key", str(gateway_key), "listen-port", str(GATEWAY_PORT),
            "peer", self.host_public_key, "allowed-ips", f"{HOST_TUNNEL}/32",
        )  # fmt: skip
        run("ip", "-n", ns, "addr", "add", f"{GATEWAY_TUNNEL}/24", "dev", self.gateway_ifname)
        run("ip", "-n", ns, "link", "set", self.gateway_ifname, "up")

    def write_config(
        self, endpoint: str = f"{GATEWAY_UNDERLAY}:{GATEWAY_PORT}", services: str = "", **extra: str
    ) -> None:
        """The connector's config; ``extra`` adds [interface] keys, ``services`` is appended."""
        interface_extra = "".join(f"{key} = {value}\n" for key, value in extra.items())
        self.config_file.write_text(
            textwrap.dedent(
                f"""\
                [interface]
                name = "{self.host_ifname}"
                private_key_file = "{self.key_file}"
                address = ["{HOST_TUNNEL}/24", "fd44::2/64"]
                """
            )
            + interface_extra
            + textwrap.dedent(
                f"""
                [[gateway]]
                name = "edge-1"
                public_key = "{self.gateway_public_key}"
                endpoints = ["{endpoint}"]
                allowed_ips = ["{GATEWAY_TUNNEL}/32", "fd44::1/128", "10.45.0.0/24"]
                persistent_keepalive = 1
                """
            )
            + services
        )

    # -- the connector ----------------------------------------------------------------------

    def tunneld_argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.host_ns, sys.executable, "-m", "tunneld", *args]

    def tunneld(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a one-shot tunneld command (in the host namespace when it needs one)."""
        argv = ["genkey"] if args == ("genkey",) else None
        command = [sys.executable, "-m", "tunneld", *args] if argv else self.tunneld_argv(*args)
        return subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, **(env or {})},
        )  # fmt: skip

    def start_daemon(
        self, log_name: str = "tunneld.log", env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log_file = (self.workdir / log_name).open("ab")
        process = subprocess.Popen(
            self.tunneld_argv("--log-level", "debug", "run", "-c", str(self.config_file)),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        log_file.close()
        self.processes.append(process)
        return process

    def daemon_log(self, log_name: str = "tunneld.log") -> str:
        path = self.workdir / log_name
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_running(self, process: subprocess.Popen[bytes], log_name: str = "tunneld.log") -> None:
        def running() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"tunneld exited with {process.returncode}:\n{self.daemon_log(log_name)}"
                )
            return "tunneld is running" in self.daemon_log(log_name)

        wait_for("tunneld to report it is running", running, timeout=30)

    def status(self) -> dict[str, Any]:
        result = self.tunneld("status", "--json", "-c", str(self.config_file))
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def wait_handshake(self, timeout: float = 20.0) -> dict[str, Any]:
        def handshake() -> dict[str, Any] | None:
            peer = self.status()["peers"][0]
            age = peer["handshake_age_seconds"]
            return peer if age is not None and age < 10 else None

        return wait_for("a WireGuard handshake with the gateway", handshake, timeout)  # type: ignore[no-any-return]

    # -- probes -----------------------------------------------------------------------------

    def gateway_connect(self, address: str, port: int, timeout: float = 3.0) -> str:
        """TCP-connect from the gateway namespace and return what the server sent."""
        script = (
            "import socket,sys;"
            f"s=socket.create_connection(({address!r},{port}),timeout={timeout});"
            "sys.stdout.write(s.recv(100).decode())"
        )
        return run(
            "ip", "netns", "exec", self.gateway_ns, sys.executable, "-c", script, check=False
        )

    def start_host_listener(
        self, address: str, port: int, banner: str, *, namespace: str | None = None
    ) -> subprocess.Popen[bytes]:
        """A TCP server in ``namespace`` (default: the host's) that greets each client with
        ``banner``; stopped by :meth:`close`."""
        script = textwrap.dedent(
            f"""
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(({address!r}, {port}))
            s.listen()
            print("listening", flush=True)
            while True:
                c, _ = s.accept()
                c.sendall({banner!r}.encode())
                c.close()
            """
        )
        process = subprocess.Popen(
            ["ip", "netns", "exec", namespace or self.host_ns, sys.executable, "-c", script],
            stdout=subprocess.PIPE,
        )
        self.processes.append(process)
        assert process.stdout is not None
        assert process.stdout.readline().strip() == b"listening"
        return process

    def host_links(self) -> str:
        return run("ip", "-n", self.host_ns, "-o", "link", "show")

    def host_routes(self) -> str:
        return run("ip", "-n", self.host_ns, "route", "show") + run(
            "ip", "-n", self.host_ns, "-6", "route", "show"
        )

    # -- what tests break and change under a running daemon -------------------------------

    def set_underlay(self, *, up: bool, side: str = "host") -> None:
        """Set the underlay veth down or up: the host's end (its NIC) or the gateway's."""
        ns, link = {
            "host": (self.host_ns, f"vh{self.suffix}"),
            "gateway": (self.gateway_ns, f"vg{self.suffix}"),
        }[side]
        run("ip", "-n", ns, "link", "set", link, "up" if up else "down")

    def write_hosts(self, entries: dict[str, str]) -> None:
        """Make the host namespace's /etc/hosts map each name to its address (and no others).

        Written in place: ``ip netns exec`` bind-mounted this very inode over /etc/hosts when the
        daemon started, so a new file renamed over it would go unseen.
        """
        lines = ["127.0.0.1 localhost", *(f"{address} {name}" for name, address in entries.items())]
        self.hosts_file.write_text("\n".join(lines) + "\n")

    def add_gateway(self, number: int = 2) -> ExtraGateway:
        """Another stock WireGuard gateway (``edge-N``), in a namespace of its own.

        It has its own veth to the host namespace (underlay 198.18.N-1.0/24: gateway .1, host .2)
        and tunnel address 10.44.0.N+1 inside the host's 10.44.0.0/24; it is torn down in
        ``close``. Its ``[[gateway]]`` table is :meth:`ExtraGateway.config_table`.
        """
        assert 2 <= number <= 9
        gateway = ExtraGateway(
            name=f"edge-{number}",
            ns=f"tdgw{number}-{self.suffix}",
            ifname=f"tdg{number}{self.suffix}",
            veth=f"vg{number}{self.suffix}",
            host_veth=f"vh{number}{self.suffix}",
            underlay=f"198.18.{number - 1}.1",
            host_underlay=f"198.18.{number - 1}.2",
            tunnel=f"10.44.0.{number + 1}",
        )
        self.extra_gateways.append(gateway)  # torn down by close, even if the rest fails
        run("ip", "netns", "add", gateway.ns)
        run("ip", "-n", gateway.ns, "link", "set", "lo", "up")
        run(
            "ip", "link", "add", gateway.veth, "netns", gateway.ns,
            "type", "veth", "peer", "name", gateway.host_veth, "netns", self.host_ns,
        )  # fmt: skip
        for ns, link, address in (
            (gateway.ns, gateway.veth, gateway.underlay),
            (self.host_ns, gateway.host_veth, gateway.host_underlay),
        ):
            run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", link)
            run("ip", "-n", ns, "link", "set", link, "up")
        private_key = run("wg", "genkey").strip()
        gateway.public_key = run("wg", "pubkey", input_text=private_key).strip()
        gateway.key_file = self.workdir / f"{gateway.name}.key"
        gateway.key_file.write_text(private_key + "\n")
        gateway.key_file.chmod(0o600)
        gateway.start(self.host_public_key)
        return gateway

    # -- tear-down --------------------------------------------------------------------------

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()
        extra_namespaces = [gateway.ns for gateway in self.extra_gateways]
        for ns in (self.gateway_ns, self.host_ns, *extra_namespaces):
            # Anything still running inside (a wireguard-go that daemonized itself) goes first.
            pids = run("ip", "netns", "pids", ns, check=False).split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.hosts_file.parent, ignore_errors=True)
        extra_ifnames = [gateway.ifname for gateway in self.extra_gateways]
        for ifname in (self.gateway_ifname, self.host_ifname, *extra_ifnames):
            Path(f"/var/run/wireguard/{ifname}.sock").unlink(missing_ok=True)


@dataclass
class ExtraGateway:
    """A further gateway made by :meth:`Topology.add_gateway` (the first is Topology's own)."""

    name: str  # its [[gateway]] name, "edge-N"
    ns: str
    ifname: str  # its WireGuard interface
    veth: str  # its underlay end
    host_veth: str  # the host namespace's end
    underlay: str  # its underlay address (the endpoint)
    host_underlay: str
    tunnel: str  # its tunnel address, /32 in its allowed_ips
    public_key: str = ""
    key_file: Path | None = None

    def start(self, host_public_key: str) -> None:
        """Start its wireguard-go and configure it with ``wg set``, as for the first gateway."""
        assert self.key_file is not None
        run("ip", "netns", "exec", self.ns, "wireguard-go", self.ifname)
        run(
            "ip", "netns", "exec", self.ns, "wg", "set", self.ifname,
            "private-key", str(self.key_file), "listen-port", str(GATEWAY_PORT),
            "peer", host_public_key, "allowed-ips", f"{HOST_TUNNEL}/32",
        )  # fmt: skip
        run("ip", "-n", self.ns, "addr", "add", f"{self.tunnel}/24", "dev", self.ifname)
        run("ip", "-n", self.ns, "link", "set", self.ifname, "up")

    def stop(self) -> None:
        """The gateway goes away: its WireGuard link is deleted (wireguard-go exits with it)."""
        run("ip", "-n", self.ns, "link", "del", self.ifname)

    def config_table(self) -> str:
        """Its ``[[gateway]]`` table for the connector's config (append it to ``services``)."""
        return textwrap.dedent(
            f"""
            [[gateway]]
            name = "{self.name}"
            public_key = "{self.public_key}"
            endpoints = ["{self.underlay}:{GATEWAY_PORT}"]
            allowed_ips = ["{self.tunnel}/32"]
            persistent_keepalive = 1
            """
        )
