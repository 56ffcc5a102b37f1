"""Tests of tunneld.probe: the packets (pure), loopback probes, and device-bound probes.

The device-bound cases need root: they build a throwaway namespace pair (unique names, deleted in
``finally``) joined by a veth link. Namespace A probes, bound to its veth end the way the daemon
binds to the WireGuard device; namespace B answers, or routes some prefixes to an ``unreachable``
route (B answers with an ICMP error) or a ``blackhole`` (nothing answers). A probe runs in a
fresh thread that has entered namespace A (``setns`` changes only the calling thread) and runs
its own ``trio.run`` under a ``fail_after`` guard. Traffic stays inside those namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import missing_prerequisite
from tunneld.config_health import HealthConfig
from tunneld.errors import PermissionError_, TunneldError
from tunneld.probe import (
    ICMP6_DEST_UNREACH,
    ICMP6_ECHO_REPLY,
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REPLY,
    ICMP_TIME_EXCEEDED,
    ProbeError,
    classify_icmp,
    echo_request,
    icmp_probe,
    icmp_socket_kind,
    internet_checksum,
    probe_gateway,
    tcp_probe,
)

T = TypeVar("T")
TOKEN = bytes(range(16))
GUARD_SECONDS = 10.0
REPO = Path(__file__).resolve().parents[2]


# --- packets --------------------------------------------------------------------------------


def test_checksum_of_the_rfc_1071_example() -> None:
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_checksum_of_an_odd_length_pads_with_zero() -> None:
    assert internet_checksum(b"\x01") == internet_checksum(b"\x01\x00") == 0xFEFF


def test_echo_request_v4_carries_a_valid_checksum() -> None:
    packet = echo_request(4, 0x1234, 0xABCD, TOKEN)
    assert packet[:2] == b"\x08\x00"
    assert packet[4:8] == bytes.fromhex("1234abcd")
    assert packet[8:] == TOKEN
    assert internet_checksum(packet) == 0


def test_echo_request_v6_leaves_the_checksum_to_the_kernel() -> None:
    packet = echo_request(6, 7, 9, TOKEN)
    assert packet[:8] == bytes([128, 0, 0, 0, 0, 7, 0, 9])


def ipv4_header(source: str = "10.44.0.1", destination: str = "10.44.0.2") -> bytes:
    return (
        bytes([0x45, 0]) + struct.pack("!H", 20 + 8 + 16) + bytes(8)
        + socket.inet_aton(source) + socket.inet_aton(destination)
    )  # fmt: skip


def icmp(kind: int, code: int, ident: int, seq: int, payload: bytes = b"") -> bytes:
    return struct.pack("!BBHHH", kind, code, 0, ident, seq) + payload


def classify(data: bytes, version: int = 4, raw_v4: bool = False, ident: int | None = 5) -> Any:
    return classify_icmp(
        data, version=version, with_ip_header=raw_v4, identifier=ident, sequence=6, token=TOKEN
    )


def test_our_echo_reply() -> None:
    reply = icmp(ICMP_ECHO_REPLY, 0, 5, 6, TOKEN)
    assert classify(reply) == "reply"
    assert classify(ipv4_header() + reply, raw_v4=True) == "reply"
    assert classify(icmp(ICMP6_ECHO_REPLY, 0, 5, 6, TOKEN), version=6) == "reply"
    assert classify(icmp(ICMP_ECHO_REPLY, 0, 999, 6, TOKEN), ident=None) == "reply"  # datagram


@pytest.mark.parametrize(
    "reply",
    [
        icmp(ICMP_ECHO_REPLY, 0, 5, 7, TOKEN),  # another sequence number
        icmp(ICMP_ECHO_REPLY, 0, 4, 6, TOKEN),  # another identifier (another process's ping)
        icmp(ICMP_ECHO_REPLY, 0, 5, 6, TOKEN[::-1]),  # another payload
        icmp(ICMP_ECHO_REPLY, 0, 5, 6),  # truncated
        icmp(8, 0, 5, 6, TOKEN),  # our own request, looped back
        icmp(ICMP6_ECHO_REPLY, 0, 5, 6, TOKEN),  # the v6 reply type on a v4 socket
        b"\x00\x00\x00",
        b"",
    ],
)
def test_anything_else_is_not_our_reply(reply: bytes) -> None:
    assert classify(reply) is None


def test_an_error_quoting_our_request_fails_the_probe() -> None:
    quoted = ipv4_header("10.44.0.2", "10.45.0.1") + echo_request(4, 5, 6, TOKEN)[:8]
    unreachable = icmp(ICMP_DEST_UNREACH, 1, 0, 0) + quoted
    assert classify(unreachable) == "destination unreachable (code 1)"
    assert classify(ipv4_header() + unreachable, raw_v4=True) == (
        "destination unreachable (code 1)"
    )
    assert classify(icmp(ICMP_TIME_EXCEEDED, 0, 0, 0) + quoted) == "time exceeded (code 0)"
    quoted_v6 = bytes(40) + echo_request(6, 5, 6, TOKEN)[:8]
    assert classify(icmp(ICMP6_DEST_UNREACH, 3, 0, 0) + quoted_v6, version=6) == (
        "destination unreachable (code 3)"
    )


def test_an_error_about_another_packet_is_ignored() -> None:
    other_ping = ipv4_header() + echo_request(4, 5, 99, TOKEN)[:8]
    assert classify(icmp(ICMP_DEST_UNREACH, 1, 0, 0) + other_ping) is None
    other_process = ipv4_header() + echo_request(4, 4, 6, TOKEN)[:8]
    assert classify(icmp(ICMP_DEST_UNREACH, 1, 0, 0) + other_process) is None
    udp = ipv4_header() + struct.pack("!HHHH", 5, 6, 8, 0)
    assert classify(icmp(ICMP_DEST_UNREACH, 3, 0, 0) + udp) is None
    assert classify(icmp(ICMP_DEST_UNREACH, 1, 0, 0) + b"\x45") is None  # truncated


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([4, 6]), st.booleans())
def test_arbitrary_bytes_never_raise(data: bytes, version: int, raw_v4: bool) -> None:
    verdict = classify(data, version, raw_v4)
    assert verdict in (None, "reply") or verdict.endswith(")")


# --- loopback -------------------------------------------------------------------------------


def icmp_allowed() -> str | None:
    """Why ICMP probes cannot run here, or None if they can."""
    try:
        icmp_socket_kind(4)
    except PermissionError_ as exc:
        return str(exc)
    return None


def closed_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


async def test_tcp_probe_to_a_listener() -> None:
    with trio.fail_after(GUARD_SECONDS):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        try:
            rtt = await tcp_probe("127.0.0.1", port, timeout_seconds=2.0)
            assert 0.0 <= rtt < 2.0
            rtt = await tcp_probe("127.0.0.1", port, timeout_seconds=2.0, ifname="lo")
            assert 0.0 <= rtt < 2.0
        finally:
            for listener in listeners:
                await listener.aclose()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_tcp_probe_refused_is_an_answer(host: str) -> None:
    with trio.fail_after(GUARD_SECONDS):
        rtt = await tcp_probe(host, closed_port(host), timeout_seconds=2.0, ifname="lo")
    assert 0.0 <= rtt < 2.0


async def test_tcp_probe_without_an_answer_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A listener whose accept queue is full drops further SYNs: nothing answers, ever.
    with contextlib.ExitStack() as stack, trio.fail_after(GUARD_SECONDS):
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            client = stack.enter_context(socket.socket())
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                client.connect(("127.0.0.1", port))
        started = trio.current_time()
        with pytest.raises(ProbeError) as info:
            await tcp_probe("127.0.0.1", port, timeout_seconds=1.5)
        assert trio.current_time() - started == pytest.approx(1.5)
    assert info.value.kind == "timeout"
    assert str(info.value) == f"connect 127.0.0.1:{port}: no answer within 1.5s"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_icmp_probe_to_loopback(host: str) -> None:
    if (reason := icmp_allowed()) is not None:
        missing_prerequisite(f"ICMP probes cannot run: {reason}")
    with trio.fail_after(GUARD_SECONDS):
        rtt = await icmp_probe(host, ifname="lo", timeout_seconds=2.0)
    assert 0.0 <= rtt < 2.0


async def test_a_missing_device_fails_the_probe() -> None:
    with trio.fail_after(GUARD_SECONDS):
        with pytest.raises(ProbeError) as info:
            await tcp_probe("127.0.0.1", 9, timeout_seconds=1.0, ifname="tdnodev0")
        assert (info.value.kind, str(info.value)) == (
            "no-device",
            "tdnodev0: no such network interface",
        )
        if icmp_allowed() is None:
            with pytest.raises(ProbeError) as info:
                await icmp_probe("127.0.0.1", ifname="tdnodev0", timeout_seconds=1.0)
            assert info.value.kind == "no-device"


async def test_probe_gateway_runs_the_configured_probe() -> None:
    with trio.fail_after(GUARD_SECONDS):
        port = closed_port()
        health = HealthConfig(probe="tcp", probe_port=port)
        address = ipaddress.ip_address("127.0.0.1")
        assert await probe_gateway(health, address, ifname="lo") >= 0.0
        if icmp_allowed() is None:
            assert await probe_gateway(HealthConfig(), address, ifname="lo") >= 0.0
        with pytest.raises(ValueError, match=r"health\.probe is 'none'"):
            await probe_gateway(HealthConfig(probe="none"), address, ifname="lo")


def test_probe_errors_are_tunneld_errors() -> None:
    error = ProbeError("timeout", "ping 10.44.0.1: no reply within 2s")
    assert isinstance(error, TunneldError)
    assert (error.kind, error.exit_code) == ("timeout", 1)


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE])
async def test_out_of_descriptors_is_not_the_gateways_failure(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """No socket for the probe says nothing about the gateway: the OSError comes out as it
    is (the supervisor skips the tick), never as a ProbeError that would count against it."""

    def exhausted(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(socket, "socket", exhausted)
    monkeypatch.setattr(trio.socket, "socket", exhausted)
    with trio.fail_after(5):
        with pytest.raises(OSError) as caught:
            await icmp_probe("127.0.0.1", ifname=None, timeout_seconds=1)
        assert not isinstance(caught.value, ProbeError) and caught.value.errno == code
        with pytest.raises(OSError) as caught:
            await tcp_probe("127.0.0.1", 9, ifname=None, timeout_seconds=1)
        assert not isinstance(caught.value, ProbeError) and caught.value.errno == code


# --- a namespace pair (root) ----------------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=20)


@dataclass
class Pair:
    """Namespace A (probing, ``10.201.0.1``/``fd20:1::1`` on ``a_link``) and B (answering).

    From A: B's prefixes 10.203/24 and fd20:3::/64 hit an ``unreachable`` route in B (which
    answers with ICMP errors), 10.204/24 and fd20:4::/64 a ``blackhole`` (silence); .9 on the
    link belongs to nobody. ``other_link`` is a second, unrelated device of A.
    """

    a: str
    b: str
    a_link: str
    b_link: str
    other_link: str

    def sysctl(self, namespace: str, setting: str) -> None:
        run("ip", "netns", "exec", namespace, "sysctl", "-qw", setting)

    def in_a(self, probe: Callable[[], Awaitable[T]]) -> T:
        """``probe()`` run by ``trio.run`` in a fresh thread inside namespace A."""
        return in_namespace(self.a, probe)


def in_namespace(namespace: str, probe: Callable[[], Awaitable[T]]) -> T:
    outcome: dict[str, Any] = {}

    async def guarded() -> T:
        with trio.fail_after(GUARD_SECONDS):
            return await probe()

    def thread() -> None:
        try:
            enter_namespace(namespace)
            outcome["value"] = trio.run(guarded)
        except BaseException as exc:  # handed to the test's thread below
            outcome["error"] = exc

    worker = threading.Thread(target=thread)
    worker.start()
    worker.join(GUARD_SECONDS + 5)
    assert not worker.is_alive(), "the probe thread did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


def enter_namespace(namespace: str) -> None:
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns({namespace}): {os.strerror(error)}")
    finally:
        os.close(fd)


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A pair of its own, for a test that changes a setting of the namespaces."""
    with namespace_pair() as topology:
        yield topology


@pytest.fixture(scope="module")
def shared_pair() -> Iterator[Pair]:
    """A pair for the tests of this module that change nothing in it."""
    with namespace_pair() as topology:
        yield topology


@contextlib.contextmanager
def namespace_pair() -> Iterator[Pair]:
    suffix = secrets.token_hex(3)
    topology = Pair(f"tdpa-{suffix}", f"tdpb-{suffix}", f"pa{suffix}", f"pb{suffix}", f"po{suffix}")
    a, b = topology.a, topology.b
    created: list[str] = []
    try:
        for namespace in (a, b):
            run("ip", "netns", "add", namespace)
            created.append(namespace)
            run("ip", "-n", namespace, "link", "set", "lo", "up")
        run("ip", "link", "add", topology.a_link, "netns", a, "type", "veth",
            "peer", "name", topology.b_link, "netns", b)  # fmt: skip
        run("ip", "-n", a, "link", "add", topology.other_link, "type", "veth",
            "peer", "name", f"pq{suffix}")  # fmt: skip
        for namespace, link, host in ((a, topology.a_link, 1), (b, topology.b_link, 2)):
            run("ip", "-n", namespace, "addr", "add", f"10.201.0.{host}/24", "dev", link)
            run("ip", "-n", namespace, "addr", "add", f"fd20:1::{host}/64", "dev", link, "nodad")
            run("ip", "-n", namespace, "link", "set", link, "up")
        run("ip", "-n", a, "addr", "add", "10.202.0.1/24", "dev", topology.other_link)
        run("ip", "-n", a, "addr", "add", "fd20:2::1/64", "dev", topology.other_link, "nodad")
        for link in (topology.other_link, f"pq{suffix}"):
            run("ip", "-n", a, "link", "set", link, "up")
        for prefix in ("10.203.0.0/24", "10.204.0.0/24"):
            run("ip", "-n", a, "route", "add", prefix, "via", "10.201.0.2")
        for prefix in ("fd20:3::/64", "fd20:4::/64"):
            run("ip", "-n", a, "-6", "route", "add", prefix, "via", "fd20:1::2")
        topology.sysctl(b, "net.ipv4.ip_forward=1")
        topology.sysctl(b, "net.ipv6.conf.all.forwarding=1")
        for kind, prefixes in (
            ("unreachable", ("10.203.0.0/24", "fd20:3::/64")),
            ("blackhole", ("10.204.0.0/24", "fd20:4::/64")),
        ):
            for prefix in prefixes:
                run("ip", "-n", b, "route", "add", kind, prefix)
        # Neighbour discovery: the first IPv6 packet on a new link waits ~1 s for it.
        for peer in ("10.201.0.2", "fd20:1::2"):
            run("ip", "netns", "exec", a, "ping", "-c", "1", "-W", "5", peer)
        yield topology
    finally:
        for namespace in created:
            subprocess.run(["ip", "netns", "del", namespace], check=False, timeout=20)


@pytest.fixture(scope="module", params=["raw", "datagram"])
def icmp_pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """A pair whose namespace A allows datagram ICMP sockets (ping_group_range) or not."""
    with namespace_pair() as pair:
        if request.param == "datagram":
            pair.sysctl(pair.a, "net.ipv4.ping_group_range=0 2147483647")
        assert pair.in_a(socket_kind) == request.param
        yield pair


async def socket_kind() -> str:
    return icmp_socket_kind()  # in this thread: a worker thread may be in another namespace


def probe_outcome(pair: Pair, probe: Callable[[], Awaitable[float]]) -> tuple[str, float, str]:
    """("ok" or the ProbeError's kind, seconds it took, message)."""

    async def timed() -> tuple[str, float, str]:
        started = trio.current_time()
        try:
            rtt = await probe()
        except ProbeError as exc:
            return exc.kind, trio.current_time() - started, str(exc)
        assert rtt <= trio.current_time() - started
        return "ok", trio.current_time() - started, ""

    return pair.in_a(timed)


@pytest.mark.root
def test_a_new_namespace_allows_no_datagram_icmp(pair: Pair) -> None:
    result = subprocess.run(
        ["ip", "netns", "exec", pair.a, "sysctl", "-n", "net.ipv4.ping_group_range"],
        check=True, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.stdout.split() == ["1", "0"]  # the kernel default: no group at all
    assert pair.in_a(socket_kind) == "raw"  # root has CAP_NET_RAW


@pytest.mark.root
@pytest.mark.parametrize("peer", ["10.201.0.2", "fd20:1::2"])
def test_ping_the_peer_through_the_bound_device(icmp_pair: Pair, peer: str) -> None:
    link = icmp_pair.a_link
    kind, seconds, _ = probe_outcome(
        icmp_pair, lambda: icmp_probe(peer, ifname=link, timeout_seconds=2.0)
    )
    assert (kind, seconds < 1.0) == ("ok", True)


@pytest.mark.root
@pytest.mark.parametrize("silent", ["10.201.0.9", "fd20:1::9", "10.204.0.1", "fd20:4::1"])
def test_ping_without_an_answer_fails_within_the_timeout(icmp_pair: Pair, silent: str) -> None:
    link = icmp_pair.a_link
    kind, seconds, message = probe_outcome(
        icmp_pair, lambda: icmp_probe(silent, ifname=link, timeout_seconds=0.5)
    )
    assert kind == "timeout"
    assert 0.5 <= seconds < 1.0
    assert message == f"ping {silent}: no reply within 0.5s"


@pytest.mark.root
@pytest.mark.parametrize("unreachable", ["10.203.0.1", "fd20:3::1"])
def test_ping_answered_by_an_icmp_error_fails_at_once(icmp_pair: Pair, unreachable: str) -> None:
    link = icmp_pair.a_link
    kind, seconds, message = probe_outcome(
        icmp_pair, lambda: icmp_probe(unreachable, ifname=link, timeout_seconds=5.0)
    )
    assert (kind, seconds < 1.0) == ("unreachable", True)
    assert message.startswith(f"ping {unreachable}: ")


@pytest.mark.root
@pytest.mark.parametrize("peer", ["10.201.0.2", "fd20:1::2"])
def test_a_probe_bound_to_another_device_does_not_escape(icmp_pair: Pair, peer: str) -> None:
    other, link = icmp_pair.other_link, icmp_pair.a_link
    kind, _, _ = probe_outcome(
        icmp_pair, lambda: icmp_probe(peer, ifname=other, timeout_seconds=0.5)
    )
    assert kind in ("timeout", "unreachable")  # v4 tries on-link ARP, v6 has no route
    kind, _, _ = probe_outcome(
        icmp_pair, lambda: tcp_probe(peer, 9, ifname=other, timeout_seconds=0.5)
    )
    assert kind in ("timeout", "unreachable")
    # The same probes bound to the right device are answered.
    assert (
        probe_outcome(icmp_pair, lambda: icmp_probe(peer, ifname=link, timeout_seconds=2.0))[0]
        == "ok"
    )
    assert (
        probe_outcome(icmp_pair, lambda: tcp_probe(peer, 9, ifname=link, timeout_seconds=2.0))[0]
        == "ok"
    )


@pytest.mark.root
@pytest.mark.parametrize("peer", ["10.201.0.2", "fd20:1::2"])
def test_tcp_refused_by_the_peer_is_a_success(shared_pair: Pair, peer: str) -> None:
    link = shared_pair.a_link
    kind, seconds, _ = probe_outcome(
        shared_pair, lambda: tcp_probe(peer, 9, ifname=link, timeout_seconds=2.0)
    )
    assert (kind, seconds < 1.0) == ("ok", True)


@pytest.mark.root
def test_tcp_accepted_by_the_peer_is_a_success(shared_pair: Pair) -> None:
    async def listen_in_b() -> socket.socket:
        listener = socket.socket()
        listener.bind(("10.201.0.2", 0))
        listener.listen(8)
        return listener

    with in_namespace(shared_pair.b, listen_in_b) as listener:
        port = listener.getsockname()[1]
        link = shared_pair.a_link
        kind, _, _ = probe_outcome(
            shared_pair, lambda: tcp_probe("10.201.0.2", port, ifname=link, timeout_seconds=2.0)
        )
    assert kind == "ok"


@pytest.mark.root
@pytest.mark.parametrize("silent", ["10.204.0.1", "fd20:4::1", "10.201.0.9"])
def test_tcp_to_a_silent_address_fails_within_the_timeout(shared_pair: Pair, silent: str) -> None:
    link = shared_pair.a_link
    kind, seconds, _ = probe_outcome(
        shared_pair, lambda: tcp_probe(silent, 9, ifname=link, timeout_seconds=0.5)
    )
    assert kind == "timeout"
    assert 0.5 <= seconds < 1.0


@pytest.mark.root
def test_tcp_answered_by_an_icmp_error_fails_at_once(shared_pair: Pair) -> None:
    link = shared_pair.a_link
    kind, seconds, message = probe_outcome(
        shared_pair, lambda: tcp_probe("10.203.0.1", 9, ifname=link, timeout_seconds=5.0)
    )
    assert (kind, seconds < 1.0) == ("unreachable", True)
    assert message == "connect 10.203.0.1:9: No route to host"


def without_cap_net_raw(pair: Pair, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", pair.a, "setpriv", "--bounding-set=-net_raw",
         "--inh-caps=-net_raw", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=30, cwd=REPO, check=False,
    )  # fmt: skip


PROBE_SCRIPT = """
import trio
from tunneld.errors import PermissionError_
from tunneld.probe import icmp_probe, icmp_socket_kind
try:
    print(icmp_socket_kind(4))
except PermissionError_ as exc:
    print("refused:", exc)
else:
    print(trio.run(lambda: icmp_probe("10.201.0.2", ifname="{link}", timeout_seconds=2.0)) < 1)
"""


@pytest.mark.root
def test_without_cap_net_raw_the_probe_needs_ping_group_range(pair: Pair) -> None:
    script = PROBE_SCRIPT.replace("{link}", pair.a_link)
    result = without_cap_net_raw(pair, script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "refused: the ICMP probe needs CAP_NET_RAW, or this process's group inside"
        " net.ipv4.ping_group_range (kernel default: none in a new network namespace); grant"
        ' one (systemd: AmbientCapabilities=CAP_NET_RAW), or set health.probe = "tcp:PORT"'
        ' or "none"'
    ]
    pair.sysctl(pair.a, f"net.ipv4.ping_group_range={os.getgid()} {os.getgid()}")
    result = without_cap_net_raw(pair, script)
    assert result.returncode == 0, result.stderr
    # A datagram socket, bound to the device without CAP_NET_RAW (Linux >= 5.7), answered.
    assert result.stdout.splitlines() == ["datagram", "True"]


def test_error_numbers_the_probe_translates() -> None:
    from tunneld.probe import _probe_error

    cases = {
        errno.ETIMEDOUT: "timeout",
        errno.ENODEV: "no-device",
        errno.ENETUNREACH: "unreachable",
        errno.EHOSTUNREACH: "unreachable",
        errno.ENOKEY: "unreachable",  # WireGuard: no peer for this address
        errno.EDESTADDRREQ: "unreachable",  # WireGuard: the peer has no endpoint
        errno.EMSGSIZE: "error",
    }
    for number, kind in cases.items():
        error = _probe_error("ping 10.44.0.1", OSError(number, "Error connecting to x: noise"))
        assert (error.kind, str(error)) == (kind, f"ping 10.44.0.1: {os.strerror(number)}")
