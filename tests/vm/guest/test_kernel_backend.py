"""The kernel backend on a real kernel: what pyroute2 sets is what the kernel (and ``wg``) sees.

Runs inside the VM only (``tests/vm``). ``wg show dump`` is the independent witness: the stock
tool reads the same genetlink state that tunneld wrote and parses back for ``tunneld status``.
"""

from __future__ import annotations

import ipaddress
import textwrap

from tests.integration.topology import GATEWAY_TUNNEL, GATEWAY_UNDERLAY, run
from tests.vm.guest import launcher, probes
from tests.vm.guest.vmtopology import VmTopology

LISTEN_PORT = 51821
FWMARK = 0x74
MTU = 1380
#: Enough allowed IPs that the kernel must split one peer over several dump messages (one IPv4
#: allowed IP takes 28 bytes, and a dump message is at most 32 KiB), and that setting them needs
#: several requests: one netlink attribute stops at 64 KiB (~2300 IPv4 allowed IPs).
MANY_ALLOWED_IPS = 5000


def kernel_config(topology: VmTopology, gateways: str, interface_extra: str = "") -> None:
    topology.config_file.write_text(
        textwrap.dedent(
            f"""\
            [interface]
            name = "{topology.host_ifname}"
            private_key_file = "{topology.key_file}"
            address = ["10.44.0.2/16", "fd44::2/64"]
            backend = "kernel"
            mtu = {MTU}
            """
        )
        + interface_extra
        + textwrap.dedent(gateways)
    )


def new_keypair() -> tuple[str, str]:
    private = run("wg", "genkey")
    return private.strip(), run("wg", "pubkey", input_text=private).strip()


def new_psk(topology: VmTopology, name: str) -> str:
    path = topology.workdir / f"{name}.psk"
    path.write_text(run("wg", "genpsk"))
    path.chmod(0o600)
    return path.read_text().strip()


def test_bring_up_sets_key_port_fwmark_peer_addresses_and_routes(topology: VmTopology) -> None:
    topology.start_gateway()
    psk = new_psk(topology, "edge-1")
    # The gateway must hold the same preshared key, or no handshake can complete.
    run(
        "ip", "netns", "exec", topology.gateway_ns, "wg", "set", topology.gateway_ifname,
        "peer", topology.host_public_key, "preshared-key", str(topology.workdir / "edge-1.psk"),
    )  # fmt: skip
    kernel_config(
        topology,
        interface_extra=f"listen_port = {LISTEN_PORT}\nfwmark = {FWMARK:#x}\n",
        gateways=f"""
            [[gateway]]
            name = "edge-1"
            public_key = "{topology.gateway_public_key}"
            endpoints = ["{GATEWAY_UNDERLAY}:51820"]
            allowed_ips = ["{GATEWAY_TUNNEL}/32", "fd44::1/128", "10.45.0.0/24", "fd45::/64"]
            persistent_keepalive = 7
            preshared_key_file = "{topology.workdir / "edge-1.psk"}"
            """,
    )

    up = topology.tunneld("--log-level", "debug", "up", "-c", str(topology.config_file))
    assert up.returncode == 0, up.stderr
    assert f"created WireGuard interface {topology.host_ifname}" in up.stderr
    assert "(kernel backend)" in up.stderr

    link = run("ip", "-n", topology.host_ns, "-d", "-o", "link", "show", topology.host_ifname)
    assert " wireguard " in link
    assert f"mtu {MTU} " in link
    assert ",UP," in link

    # What the kernel holds, read by the stock tool.
    device = topology.host_wg()
    assert device.private_key == topology.key_file.read_text().strip()
    assert device.public_key == topology.host_public_key
    assert device.listen_port == LISTEN_PORT
    assert device.fwmark == f"{FWMARK:#x}"
    assert list(device.peers) == [topology.gateway_public_key]
    peer = device.peers[topology.gateway_public_key]
    assert peer.preshared_key == psk
    assert peer.endpoint == f"{GATEWAY_UNDERLAY}:51820"
    assert set(peer.allowed_ips) == {"10.44.0.1/32", "fd44::1/128", "10.45.0.0/24", "fd45::/64"}
    assert peer.persistent_keepalive == "7"

    addresses = run("ip", "-n", topology.host_ns, "addr", "show", "dev", topology.host_ifname)
    assert "inet 10.44.0.2/16 " in addresses
    assert "inet6 fd44::2/64 " in addresses
    routes = topology.host_routes()
    assert f"10.45.0.0/24 dev {topology.host_ifname} proto 116" in routes
    assert f"fd45::/64 dev {topology.host_ifname} proto 116" in routes
    assert "10.44.0.1 " not in routes  # on-link through 10.44.0.2/16 already
    assert "default" not in routes

    # Keys, preshared key and endpoint are right if and only if the handshake completes.
    status_peer = topology.wait_handshake()
    topology.ping(topology.host_ns, GATEWAY_TUNNEL)
    topology.ping(topology.gateway_ns, "10.44.0.2")

    # `tunneld status` parses the kernel's genetlink dump; it agrees with `wg`.
    status = topology.status()
    witness = topology.host_wg().peers[topology.gateway_public_key]
    assert status["backend"] == "kernel"
    assert status["interface"] == topology.host_ifname
    assert status["public_key"] == topology.host_public_key
    assert status["listen_port"] == LISTEN_PORT
    [status_peer] = status["peers"]
    assert status_peer["name"] == "edge-1"
    assert status_peer["public_key"] == topology.gateway_public_key
    assert status_peer["endpoint"] == f"{GATEWAY_UNDERLAY}:51820"
    assert status_peer["persistent_keepalive_seconds"] == 7
    assert set(status_peer["allowed_ips"]) == set(witness.allowed_ips)
    assert int(status_peer["last_handshake_unix_seconds"]) == witness.latest_handshake
    assert 0 <= status_peer["handshake_age_seconds"] < 10
    assert 0 < status_peer["receive_bytes"] <= witness.transfer_rx
    assert 0 < status_peer["transmit_bytes"] <= witness.transfer_tx

    down = topology.tunneld("down", "-c", str(topology.config_file))
    assert down.returncode == 0, down.stderr
    assert f"{topology.host_ifname}: removed" in down.stdout
    assert topology.host_ifname not in topology.host_links()
    assert "proto 116" not in topology.host_routes()


def test_reconfigure_converges_peers_allowed_ips_and_preshared_key(topology: VmTopology) -> None:
    """Run ``tunneld up`` over an existing device: peers, allowed IPs and PSK become the new
    config exactly, the old listen port stays when none is configured, routes follow."""
    psk = new_psk(topology, "edge-1")
    _, edge2_public = new_keypair()
    _, edge3_public = new_keypair()
    # All inside 10.44.0.0/16, which is on-link: hundreds of allowed IPs, no route for each.
    many = [f"10.44.{2 + n // 250}.{1 + n % 250}/32" for n in range(MANY_ALLOWED_IPS)]
    edge1 = f"""
        [[gateway]]
        name = "edge-1"
        public_key = "{topology.gateway_public_key}"
        endpoints = ["{GATEWAY_UNDERLAY}:51820"]
        persistent_keepalive = 0
        """
    kernel_config(
        topology,
        interface_extra=f"listen_port = {LISTEN_PORT}\nfwmark = {FWMARK:#x}\n",
        gateways=edge1
        + f"""
        allowed_ips = ["{GATEWAY_TUNNEL}/32", "10.45.0.0/24"]
        preshared_key_file = "{topology.workdir / "edge-1.psk"}"

        [[gateway]]
        name = "edge-2"
        public_key = "{edge2_public}"
        endpoints = ["198.18.0.3:51820"]
        allowed_ips = [{", ".join(f'"{network}"' for network in many)}]
        """,
    )
    first = topology.tunneld("up", "-c", str(topology.config_file))
    assert first.returncode == 0, first.stderr
    device = topology.host_wg()
    assert set(device.peers) == {topology.gateway_public_key, edge2_public}
    assert device.peers[topology.gateway_public_key].preshared_key == psk
    assert len(device.peers[edge2_public].allowed_ips) == MANY_ALLOWED_IPS
    assert f"10.45.0.0/24 dev {topology.host_ifname} proto 116" in topology.host_routes()

    # The peer with 2000 allowed IPs spans two dump messages; status merges them.
    messages = launcher.call(topology.host_ns, probes.dump_message_count, topology.host_ifname)
    assert messages.value >= 2, messages
    peers = {peer["name"]: peer for peer in topology.status()["peers"]}
    assert set(peers) == {"edge-1", "edge-2"}
    assert sorted(peers["edge-2"]["allowed_ips"], key=ipaddress.ip_network) == many
    assert peers["edge-2"]["endpoint"] == "198.18.0.3:51820"

    # Now: edge-1 loses its PSK and a network, edge-2 goes, edge-3 comes; no listen_port, no
    # fwmark.
    kernel_config(
        topology,
        gateways=edge1
        + f"""
        allowed_ips = ["{GATEWAY_TUNNEL}/32"]

        [[gateway]]
        name = "edge-3"
        public_key = "{edge3_public}"
        endpoints = ["[fd00:198:18::3]:51820"]
        allowed_ips = ["10.47.0.0/24"]
        persistent_keepalive = 25
        """,
    )
    second = topology.tunneld("--log-level", "debug", "up", "-c", str(topology.config_file))
    assert second.returncode == 0, second.stderr
    assert f"adopting existing WireGuard interface {topology.host_ifname}" in second.stderr
    assert "1 stale peer(s) removed" in second.stderr
    device = topology.host_wg()
    assert set(device.peers) == {topology.gateway_public_key, edge3_public}
    edge1_now = device.peers[topology.gateway_public_key]
    assert edge1_now.preshared_key == "(none)"
    assert edge1_now.allowed_ips == (f"{GATEWAY_TUNNEL}/32",)
    assert device.peers[edge3_public].endpoint == "[fd00:198:18::3]:51820"
    assert device.peers[edge3_public].persistent_keepalive == "25"
    assert device.listen_port == LISTEN_PORT  # unset in config: the kernel's port stays
    assert device.fwmark == "off"  # unset in config means 0: cleared
    routes = topology.host_routes()
    assert "10.45.0.0/24" not in routes
    assert f"10.47.0.0/24 dev {topology.host_ifname} proto 116" in routes

    status = topology.status()
    assert {peer["name"] for peer in status["peers"]} == {"edge-1", "edge-3"}
    assert next(p for p in status["peers"] if p["name"] == "edge-3")["endpoint"] == (
        "[fd00:198:18::3]:51820"
    )

    down = topology.tunneld("down", "-c", str(topology.config_file))
    assert down.returncode == 0, down.stderr
    assert topology.host_ifname not in topology.host_links()
