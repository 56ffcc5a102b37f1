"""Kernel WireGuard backend: converge logic against an in-memory Netlink, pyroute2 adapter against
stubs and against real pyroute2 messages encoded and decoded (this machine has no WireGuard module;
the kernel itself is exercised in the VM tests)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import threading
from base64 import b64decode, b64encode
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from socket import AF_INET, AF_INET6, inet_pton
from typing import Any

import pytest
import trio
from pyroute2 import NetlinkError
from pyroute2.netlink import NLM_F_DUMP_INTR, NLM_F_MULTI
from pyroute2.netlink.generic.wireguard import (
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    AsyncWireGuard,
    wgmsg,
)
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from tunneld.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    PermissionError_,
)
from tunneld.wireguard import kernel, netlink_thread
from tunneld.wireguard.kernel import (
    KernelDevice,
    PyrouteNetlink,
    delete_kernel_device,
    kernel_supported,
    open_kernel_device,
)
from tunneld.wireguard.model import (
    DeviceConfig,
    DeviceStats,
    Endpoint,
    PeerConfig,
    PeerStats,
)

TIMEOUT = 5
IFNAME = "tunneld0"
PRIVATE = bytes([0x11] * 32)
GATEWAY = bytes([0x22] * 32)
OTHER = bytes([0x33] * 32)
STALE = bytes([0x44] * 32)
PSK = bytes([0x55] * 32)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def gateway_peer(**changes: Any) -> PeerConfig:
    peer = PeerConfig(
        public_key=GATEWAY,
        allowed_ips=(net("10.44.0.1/32"),),
        endpoint=Endpoint(ipaddress.ip_address("203.0.113.7"), 51820),
        persistent_keepalive_seconds=25,
    )
    return replace(peer, **changes)


# --------------------------------------------------------------------------------------------
# An in-memory Netlink


@dataclass
class FakeWgDevice:
    private_key: bytes | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: dict[bytes, PeerStats] = field(default_factory=dict)


class FakeNetlink:
    """Implements kernel.Netlink in memory and records every call."""

    def __init__(
        self,
        links: dict[str, str] | None = None,
        *,
        add_error: Exception | None = None,
        info_error: Exception | None = None,
    ) -> None:
        self.links = dict(links or {})
        self.devices: dict[str, FakeWgDevice] = {
            name: FakeWgDevice() for name, kind in self.links.items() if kind == "wireguard"
        }
        self.add_error = add_error
        self.info_error = info_error
        self.calls: list[tuple[Any, ...]] = []
        self.threads: set[int] = set()
        self.on_info: Callable[[], None] | None = None

    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        self.threads.add(threading.get_ident())

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]

    def _device(self, ifname: str) -> FakeWgDevice:
        if self.links.get(ifname) != "wireguard":
            raise BackendError(f"{ifname} is not a WireGuard interface")
        return self.devices[ifname]

    def link_kind(self, ifname: str) -> str | None:
        self._record("link_kind", ifname)
        return self.links.get(ifname)

    def link_add_wireguard(self, ifname: str) -> None:
        self._record("link_add_wireguard", ifname)
        if self.add_error is not None:
            raise self.add_error
        if ifname in self.links:
            raise BackendError(f"creating {ifname} failed (EEXIST)")
        self.links[ifname] = "wireguard"
        self.devices[ifname] = FakeWgDevice()

    def link_delete(self, ifname: str) -> bool:
        self._record("link_delete", ifname)
        self.devices.pop(ifname, None)
        return self.links.pop(ifname, None) is not None

    def wg_set_device(
        self, ifname: str, *, private_key: bytes, listen_port: int | None, fwmark: int
    ) -> None:
        self._record("wg_set_device", ifname, listen_port, fwmark)
        device = self._device(ifname)
        device.private_key = private_key
        if listen_port is not None:
            device.listen_port = listen_port
        device.fwmark = fwmark

    def wg_set_peer(self, ifname: str, peer: PeerConfig) -> None:
        self._record("wg_set_peer", ifname, peer.public_key)
        device = self._device(ifname)
        earlier = device.peers.get(peer.public_key, PeerStats(public_key=peer.public_key))
        device.peers[peer.public_key] = replace(
            earlier,
            endpoint=peer.endpoint or earlier.endpoint,  # None leaves the endpoint alone
            persistent_keepalive_seconds=peer.persistent_keepalive_seconds,
            allowed_ips=peer.allowed_ips,
            has_preshared_key=peer.preshared_key is not None,
        )

    def wg_remove_peer(self, ifname: str, public_key: bytes) -> None:
        self._record("wg_remove_peer", ifname, public_key)
        self._device(ifname).peers.pop(public_key, None)

    def wg_info(self, ifname: str) -> DeviceStats:
        self._record("wg_info", ifname)
        if self.on_info is not None:
            self.on_info()
        if self.info_error is not None:
            raise self.info_error
        device = self._device(ifname)
        return DeviceStats(
            public_key=None,
            listen_port=device.listen_port,
            fwmark=device.fwmark,
            peers=tuple(device.peers.values()),
        )


def test_fake_implements_the_protocol() -> None:
    netlink: kernel.Netlink = FakeNetlink()  # checked by mypy when tests are type-checked
    assert netlink is not None


# --------------------------------------------------------------------------------------------
# open / delete


async def test_open_creates_the_interface_when_absent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunneld.wireguard.kernel")
    fake = FakeNetlink()
    with trio.fail_after(TIMEOUT):
        device = await open_kernel_device(IFNAME, netlink=fake)
    assert isinstance(device, KernelDevice)
    assert (device.backend_name, device.ifname) == ("kernel", IFNAME)
    assert fake.links == {IFNAME: "wireguard"}
    assert fake.names() == ["link_kind", "link_add_wireguard"]
    assert f"created WireGuard interface {IFNAME}" in caplog.text
    assert threading.get_ident() not in fake.threads  # never on trio's thread


async def test_open_adopts_an_existing_wireguard_interface(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tunneld.wireguard.kernel")
    fake = FakeNetlink({IFNAME: "wireguard"})
    with trio.fail_after(TIMEOUT):
        device = await open_kernel_device(IFNAME, netlink=fake)
    assert device.ifname == IFNAME
    assert fake.names() == ["link_kind"]
    assert f"adopting existing WireGuard interface {IFNAME}" in caplog.text


async def test_open_refuses_a_link_of_another_kind() -> None:
    fake = FakeNetlink({IFNAME: "veth"})
    with trio.fail_after(TIMEOUT), pytest.raises(BackendError) as caught:
        await open_kernel_device(IFNAME, netlink=fake)
    message = str(caught.value)
    assert f"interface {IFNAME} exists and is a veth link, not WireGuard" in message
    assert "[interface].name" in message
    assert f"ip link del {IFNAME}" in message
    assert fake.names() == ["link_kind"]  # nothing created, nothing deleted
    assert fake.links == {IFNAME: "veth"}


async def test_open_refuses_a_physical_device_without_suggesting_to_delete_it() -> None:
    fake = FakeNetlink({"eth0": kernel.NO_KIND})
    with trio.fail_after(TIMEOUT), pytest.raises(BackendError) as caught:
        await open_kernel_device("eth0", netlink=fake)
    assert "physical or loopback" in str(caught.value)
    assert "ip link del" not in str(caught.value)


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "a:b", "a b", ".", ".."])
async def test_open_refuses_names_linux_would_refuse(name: str) -> None:
    fake = FakeNetlink()
    with trio.fail_after(TIMEOUT), pytest.raises(ConfigError, match="interface name"):
        await open_kernel_device(name, netlink=fake)
    assert fake.calls == []


async def test_fifteen_byte_name_is_accepted() -> None:
    fake = FakeNetlink()
    with trio.fail_after(TIMEOUT):
        await open_kernel_device("x" * 15, netlink=fake)
    assert "x" * 15 in fake.links


async def test_delete_removes_a_wireguard_interface_and_tolerates_absence() -> None:
    fake = FakeNetlink({IFNAME: "wireguard"})
    with trio.fail_after(TIMEOUT):
        assert await delete_kernel_device(IFNAME, netlink=fake) is True
        assert fake.links == {}
        assert await delete_kernel_device(IFNAME, netlink=fake) is False


async def test_delete_refuses_a_link_of_another_kind() -> None:
    fake = FakeNetlink({IFNAME: "bridge"})
    with trio.fail_after(TIMEOUT), pytest.raises(BackendError, match="bridge link"):
        await delete_kernel_device(IFNAME, netlink=fake)
    assert fake.links == {IFNAME: "bridge"}
    assert "link_delete" not in fake.names()


# --------------------------------------------------------------------------------------------
# configure converges


async def open_fake(fake: FakeNetlink) -> KernelDevice:
    device = await open_kernel_device(IFNAME, netlink=fake)
    fake.calls.clear()
    return device


async def test_configure_sets_device_and_peers() -> None:
    fake = FakeNetlink()
    config = DeviceConfig(private_key=PRIVATE, peers=(gateway_peer(),), listen_port=51000, fwmark=7)
    with trio.fail_after(TIMEOUT):
        device = await open_fake(fake)
        await device.configure(config)
        stats = await device.stats()
    state = fake.devices[IFNAME]
    assert (state.private_key, state.listen_port, state.fwmark) == (PRIVATE, 51000, 7)
    assert stats.listen_port == 51000
    peer = stats.peer(GATEWAY)
    assert peer is not None
    assert peer.allowed_ips == (net("10.44.0.1/32"),)
    assert peer.persistent_keepalive_seconds == 25
    assert str(peer.endpoint) == "203.0.113.7:51820"
    assert threading.get_ident() not in fake.threads


async def test_configure_removes_stale_peers_and_updates_changed_ones() -> None:
    fake = FakeNetlink({IFNAME: "wireguard"})
    fake.devices[IFNAME].peers = {
        STALE: PeerStats(public_key=STALE, allowed_ips=(net("10.44.0.9/32"),)),
        GATEWAY: PeerStats(
            public_key=GATEWAY,
            allowed_ips=(net("10.44.0.1/32"), net("10.99.0.0/16")),
            persistent_keepalive_seconds=0,
        ),
    }
    wanted = gateway_peer(allowed_ips=(net("10.44.0.1/32"), net("fd44::1/128")))
    config = DeviceConfig(private_key=PRIVATE, peers=(wanted, replace(wanted, public_key=OTHER)))
    with trio.fail_after(TIMEOUT):
        device = await open_fake(fake)
        await device.configure(config)
        stats = await device.stats()
    assert {peer.public_key for peer in stats.peers} == {GATEWAY, OTHER}
    gateway = stats.peer(GATEWAY)
    assert gateway is not None
    assert gateway.allowed_ips == (net("10.44.0.1/32"), net("fd44::1/128"))  # replaced
    assert gateway.persistent_keepalive_seconds == 25
    removes = [call for call in fake.calls if call[0] == "wg_remove_peer"]
    assert removes == [("wg_remove_peer", IFNAME, STALE)]
    # Desired peers go in before stale ones go out.
    names = fake.names()
    assert names.index("wg_remove_peer") > max(
        index for index, name in enumerate(names) if name == "wg_set_peer"
    )
    assert names[0] == "wg_set_device"


async def test_configure_is_idempotent() -> None:
    fake = FakeNetlink()
    config = DeviceConfig(private_key=PRIVATE, peers=(gateway_peer(),), listen_port=51000)
    with trio.fail_after(TIMEOUT):
        device = await open_fake(fake)
        await device.configure(config)
        first = await device.stats()
        fake.calls.clear()
        await device.configure(config)
        second = await device.stats()
    assert "wg_remove_peer" not in fake.names()
    assert first == second


async def test_configure_without_listen_port_keeps_the_current_one() -> None:
    fake = FakeNetlink()
    with trio.fail_after(TIMEOUT):
        device = await open_fake(fake)
        await device.configure(DeviceConfig(private_key=PRIVATE, listen_port=51000))
        await device.configure(DeviceConfig(private_key=PRIVATE))
    assert fake.devices[IFNAME].listen_port == 51000
    assert ("wg_set_device", IFNAME, None, 0) in fake.calls


async def test_configure_with_no_peers_removes_them_all() -> None:
    fake = FakeNetlink()
    with trio.fail_after(TIMEOUT):
        device = await open_fake(fake)
        await device.configure(DeviceConfig(private_key=PRIVATE, peers=(gateway_peer(),)))
        await device.configure(DeviceConfig(private_key=PRIVATE))
        stats = await device.stats()
    assert stats.peers == ()


async def test_removing_the_preshared_key_clears_it() -> None:
    fake = FakeNetlink()
    with trio.fail_after(TIMEOUT):
        device = await open_fake(fake)
        await device.configure(
            DeviceConfig(private_key=PRIVATE, peers=(gateway_peer(preshared_key=PSK),))
        )
        with_psk = (await device.stats()).peer(GATEWAY)
        await device.configure(DeviceConfig(private_key=PRIVATE, peers=(gateway_peer(),)))
        without_psk = (await device.stats()).peer(GATEWAY)
    assert with_psk is not None and with_psk.has_preshared_key
    assert without_psk is not None and not without_psk.has_preshared_key


async def test_concurrent_configures_do_not_interleave() -> None:
    fake = FakeNetlink()
    one = DeviceConfig(private_key=PRIVATE, peers=(gateway_peer(),))
    two = DeviceConfig(private_key=PRIVATE, peers=(gateway_peer(public_key=OTHER),))
    with trio.fail_after(TIMEOUT):
        device = await open_fake(fake)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.configure, one)
            nursery.start_soon(device.configure, two)
        stats = await device.stats()
    assert len(stats.peers) == 1  # whichever ran last won, completely
    sets = [call[0] for call in fake.calls if call[0] in ("wg_set_device", "wg_info")]
    assert sets == ["wg_set_device", "wg_info", "wg_set_device", "wg_info", "wg_info"]


async def test_close_is_a_no_op() -> None:
    fake = FakeNetlink()
    with trio.fail_after(TIMEOUT):
        device = await open_fake(fake)
        await device.close()
    assert fake.calls == []
    assert fake.links == {IFNAME: "wireguard"}


# --------------------------------------------------------------------------------------------
# kernel_supported


def probe_names(fake: FakeNetlink) -> set[str]:
    return {call[1] for call in fake.calls if call[0] == "link_add_wireguard"}


async def test_kernel_supported_when_the_probe_works() -> None:
    fake = FakeNetlink()
    with trio.fail_after(TIMEOUT):
        supported, reason = await kernel_supported(fake)
    assert (supported, reason) == (True, "kernel WireGuard available")
    (probe,) = probe_names(fake)
    assert re.fullmatch(r"tdprobe[0-9a-f]{6}", probe)
    assert len(probe.encode()) <= 15
    assert fake.names() == ["link_add_wireguard", "link_kind", "wg_info", "link_delete"]
    assert fake.links == {}  # probe deleted


async def test_probe_names_are_unique() -> None:
    fake = FakeNetlink()
    with trio.fail_after(TIMEOUT):
        for _ in range(5):
            await kernel_supported(fake)
    assert len(probe_names(fake)) == 5


async def test_kernel_not_supported_without_the_module() -> None:
    fake = FakeNetlink(add_error=BackendUnavailableError("kernel has no WireGuard module"))
    with trio.fail_after(TIMEOUT):
        supported, reason = await kernel_supported(fake)
    assert supported is False
    assert "WireGuard module" in reason
    assert fake.links == {}


async def test_kernel_not_supported_without_the_generic_netlink_family() -> None:
    fake = FakeNetlink(info_error=BackendUnavailableError("no 'wireguard' generic netlink family"))
    with trio.fail_after(TIMEOUT):
        supported, reason = await kernel_supported(fake)
    assert supported is False
    assert "generic netlink" in reason
    assert fake.links == {}  # the probe link was still deleted


async def test_kernel_supported_lets_permission_errors_through() -> None:
    fake = FakeNetlink(add_error=PermissionError_("needs root or CAP_NET_ADMIN"))
    with trio.fail_after(TIMEOUT), pytest.raises(PermissionError_):
        await kernel_supported(fake)


async def test_kernel_supported_deletes_the_probe_when_an_unexpected_error_escapes() -> None:
    fake = FakeNetlink(info_error=BackendError("something else"))
    with trio.fail_after(TIMEOUT), pytest.raises(BackendError, match="something else"):
        await kernel_supported(fake)
    assert fake.links == {}


async def test_kernel_supported_deletes_the_probe_when_cancelled_mid_probe() -> None:
    fake = FakeNetlink()
    entered, release = threading.Event(), threading.Event()

    def block() -> None:
        entered.set()
        assert release.wait(TIMEOUT)

    fake.on_info = block
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel_supported, fake)
            await trio.to_thread.run_sync(entered.wait)
            nursery.cancel_scope.cancel()
            release.set()
    assert fake.names()[-1] == "link_delete"
    assert fake.links == {}


@pytest.mark.root  # creating a probe link needs root; under CI=true missing root fails
async def test_kernel_supported_on_this_machine() -> None:
    """This machine's kernel has no WireGuard: the real probe must say so and leave nothing."""
    with trio.fail_after(TIMEOUT):
        supported, reason = await kernel_supported(PyrouteNetlink())
    if supported:  # a kernel with the module (the VM): then it is loaded now
        assert Path("/sys/module/wireguard").exists()
    else:
        assert "WireGuard module" in reason
        assert "EOPNOTSUPP" in reason
    assert not list(Path("/sys/class/net").glob("tdprobe*"))


# --------------------------------------------------------------------------------------------
# PyrouteNetlink against stubs of pyroute2's classes


class StubHandle:
    """Stands in for IPRoute / WireGuard: records calls, raises or answers as told."""

    instances: list[StubHandle]
    error: BaseException | None = None
    replies: list[Any]

    def __init__(self, **_options: Any) -> None:
        type(self).instances.append(self)
        self.calls: list[tuple[Any, ...]] = []
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def _answer(self, *call: Any) -> Any:
        self.calls.append(call)
        if self.error is not None:
            raise self.error
        return type(self).replies.pop(0) if type(self).replies else None

    def link(self, command: str, **kwargs: Any) -> Any:
        return self._answer("link", command, kwargs)

    def set(self, interface: str, **kwargs: Any) -> Any:
        return self._answer("set", interface, kwargs)

    def info(self, interface: str) -> Any:
        return self._answer("info", interface)


def stub_class(error: BaseException | None = None, replies: list[Any] | None = None) -> type:
    return type(
        "Stub", (StubHandle,), {"instances": [], "error": error, "replies": list(replies or [])}
    )


@pytest.fixture
def stub_pyroute2(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[type, type]]]:
    def install(
        error: BaseException | None = None, replies: list[Any] | None = None
    ) -> tuple[type, type]:
        iproute, wireguard = stub_class(error, replies), stub_class(error, replies)
        monkeypatch.setattr(netlink_thread, "IPRoute", iproute)
        monkeypatch.setattr(netlink_thread, "WireGuard", wireguard)
        netlink_thread.discard_handles()  # the handles this (test) thread kept: stubs from now
        return iproute, wireguard

    yield install
    netlink_thread.discard_handles()


def test_link_add_without_module_is_backend_unavailable(stub_pyroute2: Any) -> None:
    iproute, _ = stub_pyroute2(NetlinkError(errno.EOPNOTSUPP))
    with pytest.raises(BackendUnavailableError) as caught:
        PyrouteNetlink().link_add_wireguard(IFNAME)
    message = str(caught.value)
    assert "kernel has no WireGuard module" in message
    assert "EOPNOTSUPP" in message and "Operation not supported" in message
    assert IFNAME in message
    assert isinstance(caught.value.__cause__, NetlinkError)
    (handle,) = iproute.instances
    assert handle.calls == [("link", "add", {"ifname": IFNAME, "kind": "wireguard"})]
    assert not handle.closed  # the kernel's refusal leaves the long-lived handle usable


@pytest.mark.parametrize("code", [errno.EPERM, errno.EACCES])
def test_permission_errors_say_what_is_needed(stub_pyroute2: Any, code: int) -> None:
    stub_pyroute2(NetlinkError(code))
    netlink = PyrouteNetlink()
    operations: list[Callable[[], object]] = [
        lambda: netlink.link_add_wireguard(IFNAME),
        lambda: netlink.link_delete(IFNAME),
        lambda: netlink.wg_info(IFNAME),
        lambda: netlink.wg_set_device(IFNAME, private_key=PRIVATE, listen_port=None, fwmark=0),
    ]
    for operation in operations:
        with pytest.raises(PermissionError_, match="needs root or CAP_NET_ADMIN") as caught:
            operation()
        assert IFNAME in str(caught.value)
        assert errno.errorcode[code] in str(caught.value)


def test_other_errors_name_operation_interface_and_errno(stub_pyroute2: Any) -> None:
    stub_pyroute2(NetlinkError(errno.EEXIST))
    with pytest.raises(BackendError) as caught:
        PyrouteNetlink().link_add_wireguard(IFNAME)
    assert not isinstance(caught.value, BackendUnavailableError)
    assert str(caught.value) == (
        f"creating WireGuard interface {IFNAME} failed (EEXIST, File exists)"
    )


def test_kernel_extended_ack_text_is_kept(stub_pyroute2: Any) -> None:
    stub_pyroute2(NetlinkError(errno.EINVAL, "Attribute failed policy validation"))
    with pytest.raises(BackendError, match="EINVAL, Attribute failed policy validation"):
        PyrouteNetlink().wg_set_device(IFNAME, private_key=PRIVATE, listen_port=1, fwmark=0)


def test_socket_errors_are_translated_too(stub_pyroute2: Any) -> None:
    stub_pyroute2(OSError(errno.EMFILE, "Too many open files"))
    with pytest.raises(BackendError, match="EMFILE"):
        PyrouteNetlink().link_kind(IFNAME)


def test_absent_links_are_not_errors(stub_pyroute2: Any) -> None:
    stub_pyroute2(NetlinkError(errno.ENODEV))
    netlink = PyrouteNetlink()
    assert netlink.link_kind(IFNAME) is None
    assert netlink.link_delete(IFNAME) is False


def test_wireguard_errors_are_explained(stub_pyroute2: Any) -> None:
    netlink = PyrouteNetlink()
    stub_pyroute2(NetlinkError(errno.ENOENT))
    with pytest.raises(BackendUnavailableError, match="generic netlink family"):
        netlink.wg_info(IFNAME)
    stub_pyroute2(NetlinkError(errno.EOPNOTSUPP))
    with pytest.raises(BackendError, match=f"{IFNAME} is not a WireGuard interface") as caught:
        netlink.wg_set_peer(IFNAME, gateway_peer())
    assert not isinstance(caught.value, BackendUnavailableError)
    stub_pyroute2(NetlinkError(errno.ENODEV))
    with pytest.raises(BackendError, match="no such interface"):
        netlink.wg_remove_peer(IFNAME, GATEWAY)


def test_error_messages_carry_no_key_material(stub_pyroute2: Any) -> None:
    stub_pyroute2(NetlinkError(errno.EINVAL))
    netlink = PyrouteNetlink()
    keys = [PRIVATE, PSK, GATEWAY]
    messages = []
    operations: list[Callable[[], object]] = [
        lambda: netlink.wg_set_device(IFNAME, private_key=PRIVATE, listen_port=1, fwmark=0),
        lambda: netlink.wg_set_peer(IFNAME, gateway_peer(preshared_key=PSK)),
        lambda: netlink.wg_remove_peer(IFNAME, GATEWAY),
    ]
    for operation in operations:
        with pytest.raises(BackendError) as caught:
            operation()
        messages.append(str(caught.value))
    for message in messages:
        for key in keys:
            assert b64encode(key).decode() not in message
            assert key.hex() not in message


def test_link_kind_reads_the_kind_from_a_real_ifinfmsg(stub_pyroute2: Any) -> None:
    def link(name: str, kind: str | None) -> Any:
        msg = ifinfmsg()
        msg["attrs"] = [["IFLA_IFNAME", name]]
        if kind is not None:
            msg["attrs"].append(["IFLA_LINKINFO", {"attrs": [["IFLA_INFO_KIND", kind]]}])
        msg.encode()
        decoded = ifinfmsg(bytes(msg.data))
        decoded.decode()
        return [decoded]

    iproute, _ = stub_pyroute2(replies=[link(IFNAME, "wireguard"), link("lo", None)])
    netlink = PyrouteNetlink()
    assert netlink.link_kind(IFNAME) == "wireguard"
    assert netlink.link_kind("lo") == kernel.NO_KIND
    (handle,) = iproute.instances  # one long-lived handle for every call
    assert handle.calls == [("link", "get", {"ifname": IFNAME}), ("link", "get", {"ifname": "lo"})]
    assert not handle.closed


def test_link_delete_reports_success(stub_pyroute2: Any) -> None:
    iproute, _ = stub_pyroute2()
    assert PyrouteNetlink().link_delete(IFNAME) is True
    assert iproute.instances[0].calls == [("link", "del", {"ifname": IFNAME})]


def test_set_device_arguments(stub_pyroute2: Any) -> None:
    _, wireguard = stub_pyroute2()
    netlink = PyrouteNetlink()
    netlink.wg_set_device(IFNAME, private_key=PRIVATE, listen_port=None, fwmark=0)
    netlink.wg_set_device(IFNAME, private_key=PRIVATE, listen_port=51820, fwmark=7)
    (handle,) = wireguard.instances
    first, second = handle.calls
    private_b64 = b64encode(PRIVATE).decode()
    # listen_port=None is passed through as None: pyroute2 then leaves the port alone.
    assert first == ("set", IFNAME, {"private_key": private_b64, "listen_port": None, "fwmark": 0})
    assert second == (
        "set",
        IFNAME,
        {"private_key": private_b64, "listen_port": 51820, "fwmark": 7},
    )
    assert not handle.closed


# --------------------------------------------------------------------------------------------
# PyrouteNetlink against real pyroute2 messages


def encode_set_request(interface: str, peer: dict[str, Any]) -> Any:
    """What pyroute2's WireGuard.set would put on the wire for ``peer``, decoded again."""
    msg = wgmsg()
    msg["cmd"] = 1
    msg["version"] = 1
    msg["attrs"].append(["WGDEVICE_A_IFNAME", interface])
    AsyncWireGuard._wg_set_peer(AsyncWireGuard.__new__(AsyncWireGuard), msg, peer)
    msg.encode()
    decoded = wgmsg(bytes(msg.data))
    decoded.decode()
    return decoded


class EncodingWireGuard(StubHandle):
    instances: list[StubHandle] = []  # noqa: RUF012
    replies: list[Any] = []  # noqa: RUF012
    requests: list[Any] = []  # noqa: RUF012

    def set(self, interface: str, **kwargs: Any) -> Any:
        type(self).requests.append(encode_set_request(interface, kwargs["peer"]))


@pytest.fixture
def encoding_wireguard(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[EncodingWireGuard]]:
    monkeypatch.setattr(EncodingWireGuard, "requests", [])
    monkeypatch.setattr(netlink_thread, "WireGuard", EncodingWireGuard)
    netlink_thread.discard_handles()
    yield EncodingWireGuard
    netlink_thread.discard_handles()


def key_of(attr: Any) -> bytes:
    return b64decode(attr)


def test_set_peer_encodes_a_full_replacement(encoding_wireguard: Any) -> None:
    peer = gateway_peer(
        allowed_ips=(net("10.44.0.1/32"), net("fd44::/64")),
        endpoint=Endpoint(ipaddress.ip_address("2001:db8::7"), 51820),
        preshared_key=PSK,
    )
    PyrouteNetlink().wg_set_peer(IFNAME, peer)
    (request,) = encoding_wireguard.requests
    assert request.get_attr("WGDEVICE_A_IFNAME") == IFNAME
    (sent,) = request.get_attr("WGDEVICE_A_PEERS")
    assert key_of(sent.get_attr("WGPEER_A_PUBLIC_KEY")) == GATEWAY
    assert key_of(sent.get_attr("WGPEER_A_PRESHARED_KEY")) == PSK
    assert sent.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    assert sent.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    endpoint = sent.get_attr("WGPEER_A_ENDPOINT")
    assert (endpoint["family"], endpoint["addr"], endpoint["port"]) == (
        AF_INET6,
        "2001:db8::7",
        51820,
    )
    assert [a["addr"] for a in sent.get_attr("WGPEER_A_ALLOWEDIPS")] == [
        "10.44.0.1/32",
        "fd44::/64",
    ]


def test_set_peer_without_preshared_key_sends_zeros_to_clear_it(encoding_wireguard: Any) -> None:
    PyrouteNetlink().wg_set_peer(IFNAME, gateway_peer(endpoint=None, allowed_ips=()))
    (request,) = encoding_wireguard.requests
    (sent,) = request.get_attr("WGDEVICE_A_PEERS")
    assert key_of(sent.get_attr("WGPEER_A_PRESHARED_KEY")) == bytes(32)
    assert sent.get_attr("WGPEER_A_ENDPOINT") is None  # the kernel keeps the one it has
    # An empty allowed-IPs list with the replace flag: the peer ends up with none.
    assert sent.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    assert not sent.get_attr("WGPEER_A_ALLOWEDIPS")


def test_remove_peer_encodes_the_remove_flag(encoding_wireguard: Any) -> None:
    PyrouteNetlink().wg_remove_peer(IFNAME, STALE)
    (request,) = encoding_wireguard.requests
    (sent,) = request.get_attr("WGDEVICE_A_PEERS")
    assert key_of(sent.get_attr("WGPEER_A_PUBLIC_KEY")) == STALE
    assert sent.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME


def allowed_ip(cidr: str) -> dict[str, Any]:
    network = ipaddress.ip_network(cidr)
    family = AF_INET if network.version == 4 else AF_INET6
    # The kernel's order: mask, family, address.
    return {
        "attrs": [
            ["WGALLOWEDIP_A_CIDR_MASK", network.prefixlen],
            ["WGALLOWEDIP_A_FAMILY", family],
            ["WGALLOWEDIP_A_IPADDR", inet_pton(family, str(network.network_address))],
        ]
    }


def peer_attrs(public_key: bytes, *allowed: str, full: bool = True, **extra: Any) -> dict[str, Any]:
    """A peer nest as the kernel's get_peer() writes it; ``full=False`` is a continuation."""
    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", b64encode(public_key)]]
    if full:
        attrs += [
            ["WGPEER_A_PRESHARED_KEY", b64encode(extra.get("psk", bytes(32)))],
            ["WGPEER_A_LAST_HANDSHAKE_TIME", extra.get("handshake", {"tv_sec": 0, "tv_nsec": 0})],
            ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", extra.get("keepalive", 0)],
            ["WGPEER_A_TX_BYTES", extra.get("tx", 0)],
            ["WGPEER_A_RX_BYTES", extra.get("rx", 0)],
            ["WGPEER_A_PROTOCOL_VERSION", 1],
        ]
        if "endpoint" in extra:
            attrs.append(["WGPEER_A_ENDPOINT", extra["endpoint"]])
    if allowed:
        attrs.append(["WGPEER_A_ALLOWEDIPS", [allowed_ip(cidr) for cidr in allowed]])
    return {"attrs": attrs}


def dump_message(
    peers: list[dict[str, Any]], *, first: bool = True, flags: int = NLM_F_MULTI
) -> Any:
    """One message of a WG_CMD_GET_DEVICE dump, encoded and decoded as the socket would."""
    msg = wgmsg()
    msg["cmd"] = 0
    msg["version"] = 1
    msg["header"]["type"] = 0x15
    msg["header"]["flags"] = flags
    attrs: list[list[Any]] = []
    if first:  # the device attributes come in the first message only
        attrs += [
            ["WGDEVICE_A_LISTEN_PORT", 51820],
            ["WGDEVICE_A_FWMARK", 0x1337],
            ["WGDEVICE_A_IFINDEX", 7],
            ["WGDEVICE_A_IFNAME", IFNAME],
            ["WGDEVICE_A_PRIVATE_KEY", b64encode(PRIVATE)],
            ["WGDEVICE_A_PUBLIC_KEY", b64encode(OTHER)],
        ]
    if peers:
        attrs.append(["WGDEVICE_A_PEERS", peers])
    msg["attrs"] = attrs
    msg.encode()
    decoded = wgmsg(bytes(msg.data))
    decoded.decode()
    return decoded


def test_info_parses_a_real_dump_message(stub_pyroute2: Any) -> None:
    reply = [
        dump_message(
            [
                peer_attrs(
                    GATEWAY,
                    "10.44.0.1/32",
                    "fd44::/64",
                    psk=PSK,
                    handshake={"tv_sec": 1_700_000_000, "tv_nsec": 250_000_000},
                    keepalive=25,
                    tx=1234,
                    rx=5678,
                    endpoint={"addr": "203.0.113.7", "port": 51820},
                ),
                peer_attrs(STALE, endpoint={"addr": "2001:db8::1", "port": 4500}),
            ]
        )
    ]
    _, wireguard = stub_pyroute2(replies=[reply])
    stats = PyrouteNetlink().wg_info(IFNAME)
    assert wireguard.instances[0].calls == [("info", IFNAME)]
    assert not wireguard.instances[0].closed
    assert (stats.public_key, stats.listen_port, stats.fwmark) == (OTHER, 51820, 0x1337)
    gateway = stats.peer(GATEWAY)
    assert gateway == PeerStats(
        public_key=GATEWAY,
        endpoint=Endpoint(ipaddress.ip_address("203.0.113.7"), 51820),
        last_handshake_unix_seconds=1_700_000_000.25,
        receive_bytes=5678,
        transmit_bytes=1234,
        persistent_keepalive_seconds=25,
        allowed_ips=(net("10.44.0.1/32"), net("fd44::/64")),
        has_preshared_key=True,
    )
    stale = stats.peer(STALE)
    assert stale is not None
    assert str(stale.endpoint) == "[2001:db8::1]:4500"
    assert stale.last_handshake_unix_seconds is None  # zero means never
    assert stale.has_preshared_key is False  # all zeros means none
    assert stale.allowed_ips == ()


def test_info_merges_a_dump_split_over_messages(stub_pyroute2: Any) -> None:
    # The kernel ran out of room in the middle of GATEWAY's allowed IPs: the next message
    # carries only the public key and the rest of the list, then further peers.
    reply = [
        dump_message([peer_attrs(GATEWAY, "10.44.0.1/32", keepalive=25, rx=10)]),
        dump_message(
            [
                peer_attrs(GATEWAY, "10.44.0.2/32", "10.44.0.3/32", full=False),
                peer_attrs(STALE, "10.99.0.0/16"),
            ],
            first=False,
        ),
        dump_message([peer_attrs(OTHER, "10.98.0.0/16")], first=False),
    ]
    stub_pyroute2(replies=[reply])
    stats = PyrouteNetlink().wg_info(IFNAME)
    assert (stats.public_key, stats.listen_port, stats.fwmark) == (OTHER, 51820, 0x1337)
    assert [peer.public_key for peer in stats.peers] == [GATEWAY, STALE, OTHER]
    gateway = stats.peer(GATEWAY)
    assert gateway is not None
    assert gateway.allowed_ips == tuple(net(f"10.44.0.{n}/32") for n in (1, 2, 3))
    assert (gateway.persistent_keepalive_seconds, gateway.receive_bytes) == (25, 10)


def test_info_of_a_fresh_device(stub_pyroute2: Any) -> None:
    msg = wgmsg()
    msg["cmd"] = 0
    msg["attrs"] = [["WGDEVICE_A_LISTEN_PORT", 0], ["WGDEVICE_A_FWMARK", 0]]
    msg.encode()
    decoded = wgmsg(bytes(msg.data))
    decoded.decode()
    stub_pyroute2(replies=[[decoded]])
    assert PyrouteNetlink().wg_info(IFNAME) == DeviceStats()


def test_info_reads_again_when_the_dump_was_interrupted(stub_pyroute2: Any) -> None:
    interrupted = [dump_message([peer_attrs(STALE)], flags=NLM_F_MULTI | NLM_F_DUMP_INTR)]
    clean = [dump_message([peer_attrs(GATEWAY)])]
    _, wireguard = stub_pyroute2(replies=[interrupted, clean])
    stats = PyrouteNetlink().wg_info(IFNAME)
    assert [peer.public_key for peer in stats.peers] == [GATEWAY]
    (handle,) = wireguard.instances  # the same long-lived handle, asked twice
    assert handle.calls == [("info", IFNAME), ("info", IFNAME)]


def test_info_gives_up_when_the_dump_keeps_being_interrupted(stub_pyroute2: Any) -> None:
    replies = [
        [dump_message([], flags=NLM_F_MULTI | NLM_F_DUMP_INTR)]
        for _ in range(PyrouteNetlink.DUMP_ATTEMPTS)
    ]
    stub_pyroute2(replies=replies)
    with pytest.raises(BackendError, match="interrupted"):
        PyrouteNetlink().wg_info(IFNAME)


def test_info_refuses_an_empty_or_malformed_reply(stub_pyroute2: Any) -> None:
    stub_pyroute2(replies=[[]])
    with pytest.raises(BackendError, match="empty reply"):
        PyrouteNetlink().wg_info(IFNAME)
    broken = dump_message([peer_attrs(GATEWAY)])
    broken.get_attr("WGDEVICE_A_PEERS")[0]["attrs"] = []  # a peer without its public key
    stub_pyroute2(replies=[[broken]])
    with pytest.raises(BackendError, match="could not understand") as caught:
        PyrouteNetlink().wg_info(IFNAME)
    assert b64encode(PRIVATE).decode() not in str(caught.value)


def test_many_allowed_ips_are_split_over_messages_that_each_fit(encoding_wireguard: Any) -> None:
    # 5000 /32s would need ~140 KiB in one attribute whose length field stops at 64 KiB.
    networks = tuple(
        ipaddress.ip_network(f"10.{index // 65536}.{index // 256 % 256}.{index % 256}/32")
        for index in range(5000)
    )
    PyrouteNetlink().wg_set_peer(IFNAME, gateway_peer(allowed_ips=networks))
    requests = encoding_wireguard.requests
    assert len(requests) == 5
    sent_ips: list[str] = []
    for index, request in enumerate(requests):
        (sent,) = request.get_attr("WGDEVICE_A_PEERS")
        assert key_of(sent.get_attr("WGPEER_A_PUBLIC_KEY")) == GATEWAY
        replaces = sent.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
        assert replaces == (index == 0)  # the first message replaces, the rest append
        sent_ips += [a["addr"] for a in sent.get_attr("WGPEER_A_ALLOWEDIPS")]
    assert sent_ips == [str(network) for network in networks]
