"""The integration tests' two-namespace topology, adapted to the VM (kernel WireGuard available).

Same namespaces, veth, addresses and stock gateway as ``tests/integration/topology.py``; what
changes:

- tunneld commands run through :mod:`tests.vm.guest.launcher` (forked, no Python start-up each
  time: under TCG that start-up alone would cost 10 to 20 s per command);
- the gateway can also be a *kernel* WireGuard interface configured by ``wg`` (the reverse
  interop direction);
- handshakes are awaited with ``wg show`` (the stock reader of the same genetlink state) and
  probe traffic uses sockets that the test process opens inside a namespace, not a Python
  subprocess per connection.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.topology import (
    GATEWAY_PORT,
    GATEWAY_TUNNEL,
    HOST_TUNNEL,
    Topology,
    run,
    wait_for,
)
from tests.vm.guest import launcher


@dataclass(frozen=True)
class WgPeer:
    public_key: str
    preshared_key: str  # "(none)" when unset, as `wg show dump` prints it
    endpoint: str
    allowed_ips: tuple[str, ...]
    latest_handshake: int  # unix seconds, 0 = never
    transfer_rx: int
    transfer_tx: int
    persistent_keepalive: str  # "off" or seconds


@dataclass(frozen=True)
class WgDevice:
    private_key: str
    public_key: str
    listen_port: int
    fwmark: str  # "off" or 0x-hex
    peers: dict[str, WgPeer]


def wg_dump(namespace: str, ifname: str) -> WgDevice:
    """The device as the stock ``wg show IFNAME dump`` reads it from the kernel (or UAPI)."""
    lines = run("ip", "netns", "exec", namespace, "wg", "show", ifname, "dump").splitlines()
    private_key, public_key, listen_port, fwmark = lines[0].split("\t")
    peers = {}
    for line in lines[1:]:
        key, psk, endpoint, allowed, handshake, rx, tx, keepalive = line.split("\t")
        peers[key] = WgPeer(
            public_key=key,
            preshared_key=psk,
            endpoint=endpoint,
            allowed_ips=tuple(allowed.split(",")) if allowed != "(none)" else (),
            latest_handshake=int(handshake),
            transfer_rx=int(rx),
            transfer_tx=int(tx),
            persistent_keepalive=keepalive,
        )
    return WgDevice(private_key, public_key, int(listen_port), fwmark, peers)


def socket_in(namespace: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket created inside ``namespace`` (it stays there whoever uses it later)."""
    result: dict[str, Any] = {}

    def create() -> None:  # setns(2) moves only this short-lived thread
        try:
            launcher.enter_namespace(namespace)
            result["socket"] = socket.socket(family, socket.SOCK_STREAM)
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["socket"]  # type: ignore[no-any-return]


class VmTopology(Topology):
    """:class:`Topology` with forked tunneld commands and an optional kernel gateway."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.listeners: list[socket.socket] = []

    # -- tunneld, forked ----------------------------------------------------------------------

    def tunneld(self, *args: str, env: dict[str, str] | None = None) -> Any:
        namespace = None if args == ("genkey",) else self.host_ns
        return launcher.run(namespace, list(args), workdir=self.workdir, env=env)

    def start_daemon(self, log_name: str = "tunneld.log") -> Any:
        process = launcher.start(
            self.host_ns,
            ["--log-level", "debug", "run", "-c", str(self.config_file)],
            stdout=self.workdir / log_name,
        )
        self.processes.append(process)  # type: ignore[arg-type]
        return process

    # -- the gateway ------------------------------------------------------------------------

    def start_kernel_gateway(self) -> None:
        """A stock *kernel* WireGuard peer: ``ip link add type wireguard`` + ``wg set``."""
        ns = self.gateway_ns
        run("ip", "-n", ns, "link", "add", self.gateway_ifname, "type", "wireguard")
        gateway_key = self.workdir / "gateway.key"
        gateway_key.write_text(self.gateway_private_key + "\n")
        gateway_key.chmod(0o600)
        run(
            "ip", "netns", "exec", ns, "wg", "set", self.gateway_ifname,
            "private-key", str(gateway_key), "listen-port", str(GATEWAY_PORT),
            "peer", self.host_public_key, "allowed-ips", f"{HOST_TUNNEL}/32,fd44::2/128",
        )  # fmt: skip
        run("ip", "-n", ns, "addr", "add", f"{GATEWAY_TUNNEL}/24", "dev", self.gateway_ifname)
        run("ip", "-n", ns, "addr", "add", "fd44::1/64", "dev", self.gateway_ifname, "nodad")
        run("ip", "-n", ns, "link", "set", self.gateway_ifname, "up")

    def gateway_link_kind(self) -> str:
        return run("ip", "-n", self.gateway_ns, "-d", "-o", "link", "show", self.gateway_ifname)

    # -- observation ------------------------------------------------------------------------

    def host_wg(self) -> WgDevice:
        return wg_dump(self.host_ns, self.host_ifname)

    def gateway_wg(self) -> WgDevice:
        return wg_dump(self.gateway_ns, self.gateway_ifname)

    def wait_handshake(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait (polling ``wg``, cheap) for a fresh handshake, then return tunneld's status."""

        def handshake() -> bool:
            peer = self.host_wg().peers.get(self.gateway_public_key)
            return peer is not None and time.time() - peer.latest_handshake < 10

        wait_for("a WireGuard handshake with the gateway", handshake, timeout)
        return self.status()["peers"][0]  # type: ignore[no-any-return]

    # -- traffic through the tunnel ----------------------------------------------------------

    def listen(self, namespace: str, address: str, port: int, banner: str) -> None:
        """Accept one TCP connection at ``address:port`` in ``namespace``, greet it, close."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        server = socket_in(namespace, family)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((address, port))
        server.listen()
        server.settimeout(30)
        self.listeners.append(server)

        def serve() -> None:
            try:
                client, _ = server.accept()
            except OSError:
                return  # closed by close(), or nobody came: the connecting side reports that
            with client:
                client.sendall(banner.encode())

        threading.Thread(target=serve, daemon=True).start()

    def fetch(self, namespace: str, address: str, port: int, timeout: float = 10.0) -> str:
        """Connect from ``namespace`` and return what the server sent before closing."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket_in(namespace, family) as client:
            client.settimeout(timeout)
            client.connect((address, port))
            received = b""
            while chunk := client.recv(1024):
                received += chunk
        return received.decode()

    def ping(self, namespace: str, address: str) -> None:
        run("ip", "netns", "exec", namespace, "ping", "-c1", "-W5", address)

    def close(self) -> None:
        for server in self.listeners:
            server.close()
        try:
            super().close()
        finally:
            # A kernel link lives in its namespace and dies with it; nothing else to remove.
            for leftover in self.workdir.glob(".cli-*"):
                leftover.unlink(missing_ok=True)
