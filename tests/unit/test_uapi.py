"""Tests of the sans-IO UAPI codec (tunneld/wireguard/uapi.py)."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.errors import UapiError, UapiProtocolError
from tunneld.keys import public_key as public_key_of
from tunneld.wireguard.model import DeviceConfig, DeviceStats, Endpoint, PeerConfig
from tunneld.wireguard.uapi import (
    ReplyReader,
    encode_get,
    encode_set,
    parse_get_reply,
    parse_set_reply,
)

PRIVATE = bytes(range(1, 33))
PEER_A = bytes(range(100, 132))
PEER_B = bytes(range(200, 232))
PSK = bytes(range(50, 82))
ZERO_HEX = "0" * 64


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def endpoint(text: str, port: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(text), port)


TWO_PEERS = DeviceConfig(
    private_key=PRIVATE,
    listen_port=51820,
    fwmark=0,
    peers=(
        PeerConfig(
            public_key=PEER_A,
            allowed_ips=(net("10.44.0.1/32"), net("fd44::1/128")),
            endpoint=endpoint("203.0.113.7", 51820),
            persistent_keepalive_seconds=25,
            preshared_key=PSK,
        ),
        PeerConfig(
            public_key=PEER_B,
            allowed_ips=(net("10.45.0.0/16"),),
            endpoint=endpoint("2001:db8::7", 443),
            persistent_keepalive_seconds=0,
        ),
    ),
)


def reader_replies(data: bytes, **kwargs: int) -> list[list[tuple[str, str]]]:
    """Every complete reply in ``data`` fed as one chunk."""
    reader = ReplyReader(**kwargs)
    reader.receive_data(data)
    replies = []
    while (reply := reader.next_reply()) is not None:
        replies.append(reply)
    return replies


def feed(reader: ReplyReader, data: bytes) -> None:
    """``receive_data`` without the EOF meaning of an empty slice."""
    if data:
        reader.receive_data(data)


def one_reply(data: bytes) -> list[tuple[str, str]]:
    replies = reader_replies(data)
    assert len(replies) == 1
    return replies[0]


def get_reply_for(config: DeviceConfig) -> bytes:
    """What wireguard-go answers to ``get=1`` once ``config`` is applied, in its line order."""
    lines = [f"private_key={config.private_key.hex()}"]
    lines.append(f"listen_port={config.listen_port or 0}")
    if config.fwmark:
        lines.append(f"fwmark={config.fwmark}")
    for peer in config.peers:
        lines.append(f"public_key={peer.public_key.hex()}")
        preshared = peer.preshared_key.hex() if peer.preshared_key else ZERO_HEX
        lines.append(f"preshared_key={preshared}")
        lines.append("protocol_version=1")
        if peer.endpoint is not None:
            lines.append(f"endpoint={peer.endpoint}")
        lines += [
            "last_handshake_time_sec=0",
            "last_handshake_time_nsec=0",
            "tx_bytes=0",
            "rx_bytes=0",
            f"persistent_keepalive_interval={peer.persistent_keepalive_seconds}",
        ]
        lines += [f"allowed_ip={network}" for network in peer.allowed_ips]
    lines.append("errno=0")
    return ("\n".join(lines) + "\n\n").encode()


# Mirrors a reply captured from wireguard-go v0.0.20220316 after a handshake (keys replaced).
REALISTIC_GET_REPLY = (
    f"private_key={PRIVATE.hex()}\n"
    "listen_port=52001\n"
    "fwmark=5\n"
    f"public_key={PEER_A.hex()}\n"
    f"preshared_key={PSK.hex()}\n"
    "protocol_version=1\n"
    "endpoint=127.0.0.1:52002\n"
    "last_handshake_time_sec=1795608546\n"
    "last_handshake_time_nsec=889552694\n"
    "tx_bytes=244\n"
    "rx_bytes=92\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=10.99.0.2/32\n"
    "allowed_ip=fd99::/64\n"
    f"public_key={PEER_B.hex()}\n"
    f"preshared_key={ZERO_HEX}\n"
    "protocol_version=1\n"
    "endpoint=[2001:db8::7]:51820\n"
    "last_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\n"
    "tx_bytes=0\n"
    "rx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    "errno=0\n"
    "\n"
).encode()


# --- requests ---------------------------------------------------------------------------------


def test_encode_get() -> None:
    assert encode_get() == b"get=1\n\n"


def test_encode_set_two_peers_exact_bytes() -> None:
    expected = (
        "set=1\n"
        f"private_key={PRIVATE.hex()}\n"
        "listen_port=51820\n"
        "fwmark=0\n"
        "replace_peers=true\n"
        f"public_key={PEER_A.hex()}\n"
        "replace_allowed_ips=true\n"
        "endpoint=203.0.113.7:51820\n"
        "persistent_keepalive_interval=25\n"
        f"preshared_key={PSK.hex()}\n"
        "protocol_version=1\n"
        "allowed_ip=10.44.0.1/32\n"
        "allowed_ip=fd44::1/128\n"
        f"public_key={PEER_B.hex()}\n"
        "replace_allowed_ips=true\n"
        "endpoint=[2001:db8::7]:443\n"
        "persistent_keepalive_interval=0\n"
        f"preshared_key={ZERO_HEX}\n"
        "protocol_version=1\n"
        "allowed_ip=10.45.0.0/16\n"
        "\n"
    ).encode()
    assert encode_set(TWO_PEERS) == expected


def test_encode_set_without_listen_port_or_peers() -> None:
    config = DeviceConfig(private_key=PRIVATE, fwmark=0x51)
    assert encode_set(config) == (
        f"set=1\nprivate_key={PRIVATE.hex()}\nfwmark=81\nreplace_peers=true\n\n".encode()
    )


def test_encode_set_peer_without_endpoint_or_allowed_ips() -> None:
    config = DeviceConfig(private_key=PRIVATE, peers=(PeerConfig(public_key=PEER_A),))
    assert encode_set(config).endswith(
        (
            f"public_key={PEER_A.hex()}\nreplace_allowed_ips=true\n"
            f"persistent_keepalive_interval=0\npreshared_key={ZERO_HEX}\nprotocol_version=1\n\n"
        ).encode()
    )


@pytest.mark.parametrize(
    "config",
    [
        DeviceConfig(private_key=PRIVATE[:31]),
        DeviceConfig(private_key=PRIVATE + b"\x00"),
        DeviceConfig(private_key=PRIVATE, peers=(PeerConfig(public_key=PEER_A[:16]),)),
        DeviceConfig(private_key=PRIVATE, peers=(PeerConfig(PEER_A, preshared_key=PSK[:5]),)),
    ],
)
def test_encode_set_rejects_keys_that_are_not_32_bytes(config: DeviceConfig) -> None:
    with pytest.raises(ValueError, match="must be 32 bytes") as info:
        encode_set(config)
    assert PRIVATE[:16].hex() not in str(info.value)
    assert PSK[:5].hex() not in str(info.value)


@pytest.mark.parametrize(
    "config",
    [
        DeviceConfig(private_key=PRIVATE, listen_port=65536),
        DeviceConfig(private_key=PRIVATE, listen_port=-1),
        DeviceConfig(private_key=PRIVATE, fwmark=1 << 32),
        DeviceConfig(
            private_key=PRIVATE, peers=(PeerConfig(PEER_A, persistent_keepalive_seconds=70000),)
        ),
        DeviceConfig(
            private_key=PRIVATE, peers=(PeerConfig(PEER_A, endpoint=endpoint("1.2.3.4", 70000)),)
        ),
    ],
)
def test_encode_set_rejects_numbers_out_of_range(config: DeviceConfig) -> None:
    with pytest.raises(ValueError, match="must be between"):
        encode_set(config)


def test_encode_set_refuses_to_inject_lines_from_untyped_input() -> None:
    sneaky = PeerConfig(PEER_A, allowed_ips=("10.0.0.0/8\nprivate_key=00",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="newline"):
        encode_set(DeviceConfig(private_key=PRIVATE, peers=(sneaky,)))


# --- reply framing ----------------------------------------------------------------------------


def test_reader_returns_none_until_the_empty_line() -> None:
    reader = ReplyReader()
    assert reader.next_reply() is None
    reader.receive_data(b"errno=0\n")
    assert reader.next_reply() is None
    reader.receive_data(b"\n")
    assert reader.next_reply() == [("errno", "0")]
    assert reader.next_reply() is None


def test_reader_gives_the_same_reply_whatever_the_split() -> None:
    expected = one_reply(REALISTIC_GET_REPLY)
    for offset in range(len(REALISTIC_GET_REPLY) + 1):
        reader = ReplyReader()
        feed(reader, REALISTIC_GET_REPLY[:offset])
        first = reader.next_reply()
        feed(reader, REALISTIC_GET_REPLY[offset:])
        second = reader.next_reply()
        assert (first if offset == len(REALISTIC_GET_REPLY) else second) == expected
        assert reader.next_reply() is None


def test_reader_fed_one_byte_at_a_time() -> None:
    reader = ReplyReader()
    replies = []
    for index in range(len(REALISTIC_GET_REPLY)):
        reader.receive_data(REALISTIC_GET_REPLY[index : index + 1])
        if (reply := reader.next_reply()) is not None:
            replies.append(reply)
    assert replies == [one_reply(REALISTIC_GET_REPLY)]


@given(st.lists(st.integers(min_value=0, max_value=len(REALISTIC_GET_REPLY) * 2), max_size=8))
def test_reader_split_into_many_chunks(cuts: list[int]) -> None:
    data = REALISTIC_GET_REPLY + b"errno=0\n\n"
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    reader = ReplyReader()
    replies = []
    for start, end in itertools.pairwise(points):
        reader.receive_data(data[start:end])
        while (reply := reader.next_reply()) is not None:
            replies.append(reply)
    assert replies == [one_reply(REALISTIC_GET_REPLY), [("errno", "0")]]


def test_two_replies_in_one_chunk_and_a_partial_third() -> None:
    reader = ReplyReader()
    reader.receive_data(b"errno=0\n\nlisten_port=1\nerrno=0\n\nerrno=")
    assert reader.next_reply() == [("errno", "0")]
    assert reader.next_reply() == [("listen_port", "1"), ("errno", "0")]
    assert reader.next_reply() is None
    reader.receive_data(b"-22\n\n")
    assert reader.next_reply() == [("errno", "-22")]


def test_value_may_contain_equals_sign() -> None:
    assert one_reply(b"future_key=a=b\nerrno=0\n\n") == [("future_key", "a=b"), ("errno", "0")]


def test_empty_line_alone_is_a_reply_without_errno() -> None:
    reader = ReplyReader()
    reader.receive_data(b"\nerrno=0\n\n")
    empty = reader.next_reply()
    assert empty == []
    assert reader.next_reply() == [("errno", "0")]
    with pytest.raises(UapiProtocolError, match="no errno"):
        parse_set_reply(empty)


def test_eof_mid_reply_is_a_protocol_error() -> None:
    reader = ReplyReader()
    reader.receive_data(b"listen_port=51820\nerr")
    assert reader.next_reply() is None
    reader.receive_data(b"")
    with pytest.raises(UapiProtocolError, match="middle of a reply"):
        reader.next_reply()


def test_eof_without_any_reply_is_a_protocol_error() -> None:
    # wireguard-go closes the connection instead of answering an invalid request.
    reader = ReplyReader()
    reader.receive_data(b"")
    with pytest.raises(UapiProtocolError, match="closed without a reply"):
        reader.next_reply()


def test_eof_after_complete_replies_hands_them_out_first() -> None:
    reader = ReplyReader()
    reader.receive_data(b"errno=0\n\nerrno=1\n\n")
    reader.receive_data(b"")
    assert reader.next_reply() == [("errno", "0")]
    assert reader.next_reply() == [("errno", "1")]
    with pytest.raises(UapiProtocolError):
        reader.next_reply()


def test_data_after_eof_is_a_caller_bug() -> None:
    reader = ReplyReader()
    reader.receive_data(b"")
    reader.receive_data(b"")  # a second EOF is harmless
    with pytest.raises(RuntimeError):
        reader.receive_data(b"errno=0\n\n")


def test_oversized_unfinished_reply() -> None:
    reader = ReplyReader(max_reply_bytes=64)
    reader.receive_data(b"listen_port=1\n" * 4)
    assert reader.next_reply() is None
    reader.receive_data(b"listen_port=1\n" * 1)
    with pytest.raises(UapiProtocolError, match="exceeds 64 bytes"):
        reader.next_reply()


def test_oversized_complete_reply_in_one_chunk() -> None:
    with pytest.raises(UapiProtocolError, match="exceeds the limit"):
        reader_replies(b"listen_port=1\n" * 10 + b"errno=0\n\n", max_reply_bytes=64)


def test_reply_of_exactly_the_limit_is_accepted_at_any_split() -> None:
    reply = b"unknown=" + b"x" * 10 + b"\nerrno=0\n\n"
    for limit, accepted in ((len(reply), True), (len(reply) - 1, False)):
        for offset in range(len(reply) + 1):
            reader = ReplyReader(max_reply_bytes=limit)
            try:
                feed(reader, reply[:offset])
                first = reader.next_reply()
                feed(reader, reply[offset:])
                result = first or reader.next_reply()
            except UapiProtocolError:
                assert not accepted, (limit, offset)
            else:
                assert accepted, (limit, offset)
                assert result == [("unknown", "x" * 10), ("errno", "0")]


def test_default_limit_allows_a_large_device() -> None:
    peers = tuple(
        PeerConfig(
            public_key=index.to_bytes(32, "big"),
            allowed_ips=tuple(net(f"10.{index // 250}.{index % 250}.{n}/32") for n in range(8)),
            endpoint=endpoint("192.0.2.1", 1000 + index),
        )
        for index in range(1000)
    )
    data = get_reply_for(DeviceConfig(private_key=PRIVATE, peers=peers))
    assert len(data) < 1 << 20
    assert len(parse_get_reply(one_reply(data)).peers) == 1000


def test_reader_stays_broken_after_an_error() -> None:
    reader = ReplyReader()
    reader.receive_data(b"garbage\n\nerrno=0\n\n")
    with pytest.raises(UapiProtocolError, match="no '='") as first:
        reader.next_reply()
    reader.receive_data(b"errno=0\n\n")
    with pytest.raises(UapiProtocolError) as second:
        reader.next_reply()
    assert str(second.value) == str(first.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"listen_port 51820\nerrno=0\n\n", "line 1 has no '='"),
        (b"errno=0\nlisten_port\n\n", "line 2 has no '='"),
        (b"=5\nerrno=0\n\n", "malformed key"),
        (b"Listen_Port=5\nerrno=0\n\n", "malformed key"),
        (b"listen_port=5\r\nerrno=0\n\n", "control character"),
        (b"listen_port=\x005\nerrno=0\n\n", "control character"),
        (b"endpoint=\xff\nerrno=0\n\n", "byte 9 is not ASCII"),
    ],
)
def test_reader_rejects_lines_that_are_not_key_value(data: bytes, message: str) -> None:
    with pytest.raises(UapiProtocolError, match=message):
        reader_replies(data)


def test_quoted_garbage_is_truncated() -> None:
    with pytest.raises(UapiProtocolError) as info:
        reader_replies(b"x" * 500 + b"\nerrno=0\n\n")
    assert "'" + "x" * 60 + "'..." in str(info.value)
    assert "x" * 61 not in str(info.value)


# --- reply meaning ----------------------------------------------------------------------------


def test_parse_set_reply_success() -> None:
    parse_set_reply(one_reply(b"errno=0\n\n"))


@pytest.mark.parametrize("errno", [1, -22])
def test_parse_set_reply_refusal(errno: int) -> None:
    with pytest.raises(UapiError) as info:
        parse_set_reply(one_reply(f"errno={errno}\n\n".encode()))
    assert info.value.errno == errno
    assert info.value.operation == "set"


def test_parse_get_reply_refusal() -> None:
    with pytest.raises(UapiError) as info:
        parse_get_reply(one_reply(b"errno=1\n\n"))
    assert (info.value.errno, info.value.operation) == (1, "get")


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([], "no errno"),
        ([("listen_port", "1")], "no errno"),
        ([("errno", "0"), ("listen_port", "1")], "must end with"),
        ([("errno", "0"), ("errno", "0")], "must end with"),
        ([("errno", "zero")], "not an integer"),
        ([("errno", "")], "not an integer"),
        ([("errno", "+1")], "not an integer"),
        ([("errno", "1" * 5000)], "not an integer"),
    ],
)
def test_bad_errno_is_a_protocol_error(pairs: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(UapiProtocolError, match=message):
        parse_set_reply(pairs)
    with pytest.raises(UapiProtocolError, match=message):
        parse_get_reply(pairs)


def test_parse_realistic_get_reply() -> None:
    stats = parse_get_reply(one_reply(REALISTIC_GET_REPLY))
    # Derived from the private key, which itself is not kept.
    assert stats.public_key == public_key_of(PRIVATE)
    assert PRIVATE not in repr(stats).encode()
    assert (stats.listen_port, stats.fwmark) == (52001, 5)
    assert [peer.public_key for peer in stats.peers] == [PEER_A, PEER_B]

    first = stats.peer(PEER_A)
    assert first is not None
    assert first.endpoint == endpoint("127.0.0.1", 52002)
    assert first.last_handshake_unix_seconds == pytest.approx(1795608546.889552694, abs=1e-6)
    assert (first.transmit_bytes, first.receive_bytes) == (244, 92)
    assert first.persistent_keepalive_seconds == 25
    assert first.allowed_ips == (net("10.99.0.2/32"), net("fd99::/64"))
    assert first.has_preshared_key

    second = stats.peer(PEER_B)
    assert second is not None
    assert second.endpoint == endpoint("2001:db8::7", 51820)
    assert second.last_handshake_unix_seconds is None
    assert second.persistent_keepalive_seconds == 0
    assert second.allowed_ips == ()
    assert not second.has_preshared_key


def test_stats_never_carry_the_private_key() -> None:
    stats = parse_get_reply(one_reply(REALISTIC_GET_REPLY))
    for text in (repr(stats), str(stats)):
        assert PRIVATE.hex() not in text
        assert PSK.hex() not in text


def test_get_reply_of_an_unconfigured_device() -> None:
    # wireguard-go before any set: no private key, no peers.
    assert parse_get_reply(one_reply(b"listen_port=38904\nerrno=0\n\n")) == DeviceStats(
        listen_port=38904
    )
    assert parse_get_reply([("errno", "0")]) == DeviceStats()


def test_round_trip_config_to_stats() -> None:
    stats = parse_get_reply(one_reply(get_reply_for(TWO_PEERS)))
    assert stats.listen_port == TWO_PEERS.listen_port
    assert stats.fwmark == TWO_PEERS.fwmark
    assert len(stats.peers) == len(TWO_PEERS.peers)
    for wanted in TWO_PEERS.peers:
        got = stats.peer(wanted.public_key)
        assert got is not None
        assert got.endpoint == wanted.endpoint
        assert got.allowed_ips == wanted.allowed_ips
        assert got.persistent_keepalive_seconds == wanted.persistent_keepalive_seconds
        assert got.has_preshared_key == (wanted.preshared_key is not None)
        assert got.last_handshake_unix_seconds is None


keys = st.binary(min_size=32, max_size=32)
ipv4_networks = st.builds(
    lambda address, prefix: ipaddress.IPv4Network((address, prefix), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
ipv6_networks = st.builds(
    lambda address, prefix: ipaddress.IPv6Network((address, prefix), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
endpoints = st.builds(
    Endpoint,
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(0, 65535),
)
peer_configs = st.builds(
    PeerConfig,
    public_key=keys,
    allowed_ips=st.lists(st.one_of(ipv4_networks, ipv6_networks), max_size=4).map(tuple),
    endpoint=st.none() | endpoints,
    persistent_keepalive_seconds=st.integers(0, 65535),
    preshared_key=st.none() | keys.filter(lambda key: key != bytes(32)),
)
device_configs = st.builds(
    DeviceConfig,
    private_key=keys,
    peers=st.lists(peer_configs, max_size=4, unique_by=lambda peer: peer.public_key).map(tuple),
    listen_port=st.none() | st.integers(0, 65535),
    fwmark=st.integers(0, 2**32 - 1),
)


@given(device_configs)
def test_round_trip_any_config(config: DeviceConfig) -> None:
    encode_set(config)  # valid configs always encode
    stats = parse_get_reply(one_reply(get_reply_for(config)))
    assert stats.fwmark == config.fwmark
    assert [peer.public_key for peer in stats.peers] == [peer.public_key for peer in config.peers]
    for wanted, got in zip(config.peers, stats.peers, strict=True):
        assert got.endpoint == wanted.endpoint
        assert got.allowed_ips == wanted.allowed_ips
        assert got.persistent_keepalive_seconds == wanted.persistent_keepalive_seconds
        assert got.has_preshared_key == (wanted.preshared_key is not None)


def test_handshake_time_combines_seconds_and_nanoseconds() -> None:
    def handshake(seconds: str, nanoseconds: str) -> float | None:
        pairs = [
            ("public_key", PEER_A.hex()),
            ("last_handshake_time_sec", seconds),
            ("last_handshake_time_nsec", nanoseconds),
            ("errno", "0"),
        ]
        return parse_get_reply(pairs).peers[0].last_handshake_unix_seconds

    assert handshake("0", "0") is None
    assert handshake("10", "0") == 10.0
    assert handshake("0", "500000000") == 0.5
    assert handshake("1700000000", "250000000") == 1700000000.25


def test_endpoint_zone_is_dropped_and_mapped_addresses_kept() -> None:
    def parsed(text: str) -> Endpoint | None:
        pairs = [("public_key", PEER_A.hex()), ("endpoint", text), ("errno", "0")]
        return parse_get_reply(pairs).peers[0].endpoint

    assert parsed("[fe80::1%eth0]:51820") == endpoint("fe80::1", 51820)
    assert parsed("[::ffff:1.2.3.4]:1") == endpoint("::ffff:1.2.3.4", 1)
    assert parsed("1.2.3.4:0") == endpoint("1.2.3.4", 0)


def test_unknown_keys_are_tolerated() -> None:
    reply = REALISTIC_GET_REPLY.replace(
        b"listen_port=52001\n", b"listen_port=52001\nfuture_device_knob=on\n"
    ).replace(b"tx_bytes=244\n", b"tx_bytes=244\nfuture_peer_counter=7\nfuture_peer_counter=8\n")
    assert parse_get_reply(one_reply(reply)) == parse_get_reply(one_reply(REALISTIC_GET_REPLY))
    parse_set_reply([("set", "whatever"), ("errno", "0")])


def _peer_pairs(*extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [("public_key", PEER_A.hex()), *extra, ("errno", "0")]


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([("public_key", "zz" * 32), ("errno", "0")], "public_key line is not 64 hex"),
        ([("public_key", PEER_A.hex()[:62]), ("errno", "0")], "not 64 hex"),
        ([("public_key", PEER_A.hex() + "00"), ("errno", "0")], "not 64 hex"),
        ([("listen_port", "51820x"), ("errno", "0")], "listen_port is not an unsigned"),
        ([("listen_port", "-1"), ("errno", "0")], "not an unsigned"),
        ([("listen_port", "65536"), ("errno", "0")], "above its maximum"),
        ([("fwmark", " 5"), ("errno", "0")], "not an unsigned"),
        ([("fwmark", "4294967296"), ("errno", "0")], "above its maximum"),
        ([("listen_port", "1"), ("listen_port", "2"), ("errno", "0")], "repeats"),
        (_peer_pairs(("tx_bytes", "1.5")), "tx_bytes is not an unsigned"),
        (_peer_pairs(("rx_bytes", "")), "rx_bytes is not an unsigned"),
        (_peer_pairs(("rx_bytes", "9" * 5000)), "rx_bytes is not an unsigned"),
        (_peer_pairs(("rx_bytes", "18446744073709551616")), "above its maximum"),
        (_peer_pairs(("last_handshake_time_nsec", "1000000000")), "above its maximum"),
        (_peer_pairs(("persistent_keepalive_interval", "65536")), "above its maximum"),
        (_peer_pairs(("protocol_version", "one")), "not an unsigned"),
        (_peer_pairs(("endpoint", "1.2.3.4")), "endpoint has no port"),
        (_peer_pairs(("endpoint", "1.2.3.4:99999")), "above its maximum"),
        (_peer_pairs(("endpoint", "1.2.3.4:")), "not an unsigned"),
        (_peer_pairs(("endpoint", "noport")), "endpoint has no port"),
        (_peer_pairs(("endpoint", "::1:51820")), "not IPv4:port"),
        (_peer_pairs(("endpoint", "[1.2.3.4]:1")), "not IPv4:port"),
        (_peer_pairs(("endpoint", "[::1:1")), "not IPv4:port"),
        (_peer_pairs(("endpoint", "example.com:1")), "not IPv4:port"),
        (_peer_pairs(("endpoint", "01.2.3.4:1")), "not IPv4:port"),
        (_peer_pairs(("allowed_ip", "10.0.0.1")), "allowed_ip is not"),
        (_peer_pairs(("allowed_ip", "10.0.0.0/33")), "allowed_ip is not"),
        (_peer_pairs(("allowed_ip", "10.0.0.0/255.0.0.0")), "allowed_ip is not"),
        (_peer_pairs(("allowed_ip", "fe80::%eth0/64")), "allowed_ip is not"),
        (_peer_pairs(("allowed_ip", "/8")), "allowed_ip is not"),
        (_peer_pairs(("endpoint", "1.2.3.4:1"), ("endpoint", "1.2.3.4:2")), "repeats endpoint"),
        ([("tx_bytes", "0"), ("errno", "0")], "tx_bytes before any public_key"),
        ([("allowed_ip", "10.0.0.0/8"), ("errno", "0")], "before any public_key"),
        (_peer_pairs(("listen_port", "1")), "device attribute listen_port after a peer"),
        (_peer_pairs(("public_key", PEER_A.hex())), "twice"),
    ],
)
def test_malformed_get_reply(pairs: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(UapiProtocolError, match=message):
        parse_get_reply(pairs)


def test_allowed_ips_with_host_bits_are_masked() -> None:
    stats = parse_get_reply(_peer_pairs(("allowed_ip", "10.1.2.3/8")))
    assert stats.peers[0].allowed_ips == (net("10.0.0.0/8"),)


# --- secrets never leak -----------------------------------------------------------------------

SECRET_HEX = PRIVATE.hex()


@pytest.mark.parametrize("key", ["private_key", "preshared_key"])
@pytest.mark.parametrize(
    "bad_value",
    [
        SECRET_HEX[:-1] + "g",  # not hex
        SECRET_HEX[:-2],  # too short
        SECRET_HEX + "ab",  # too long
        SECRET_HEX.upper() + " ",  # trailing space
        SECRET_HEX[:20] + "-" + SECRET_HEX[20:],
    ],
)
def test_malformed_secret_line_is_not_echoed(key: str, bad_value: str) -> None:
    if key == "private_key":
        pairs = [(key, bad_value), ("errno", "0")]
    else:
        pairs = _peer_pairs((key, bad_value))
    with pytest.raises(UapiProtocolError, match=key) as info:
        parse_get_reply(pairs)
    _assert_no_secret(info.value)


@pytest.mark.parametrize(
    "line",
    [
        f"private_key {SECRET_HEX}",  # no '='
        f"private_key{SECRET_HEX}",
        SECRET_HEX,  # a bare key, as if the stream were out of step
        f"preshared_key\t{SECRET_HEX}",
        f"Private_Key={SECRET_HEX}",  # bad key name, value must not show either
        f"{SECRET_HEX}={SECRET_HEX}",
    ],
)
def test_garbage_that_may_hold_a_key_is_withheld(line: str) -> None:
    with pytest.raises(UapiProtocolError) as info:
        reader_replies(line.encode() + b"\nerrno=0\n\n")
    _assert_no_secret(info.value)


def test_control_character_in_secret_line_is_not_echoed() -> None:
    with pytest.raises(UapiProtocolError, match="private_key") as info:
        reader_replies(f"private_key={SECRET_HEX}\r\nerrno=0\n\n".encode())
    _assert_no_secret(info.value)


def _assert_no_secret(error: Exception) -> None:
    for text in (str(error), repr(error)):
        for start in range(0, len(SECRET_HEX) - 16 + 1):
            assert SECRET_HEX[start : start + 16].lower() not in text.lower()
    assert error.__cause__ is None


# --- fuzzing ----------------------------------------------------------------------------------

ALLOWED_ERRORS = (UapiProtocolError, UapiError)


def _drain(chunks: list[bytes], eof: bool, max_reply_bytes: int) -> None:
    """Feed chunks, parse every reply both ways; only the codec's own errors may escape."""
    reader = ReplyReader(max_reply_bytes=max_reply_bytes)
    for chunk in [*chunks, b""] if eof else chunks:
        reader.receive_data(chunk)
        while True:
            try:
                reply = reader.next_reply()
            except ALLOWED_ERRORS:
                return
            if reply is None:
                break
            for parse in (parse_get_reply, parse_set_reply):
                with contextlib.suppress(*ALLOWED_ERRORS):
                    parse(reply)


@settings(max_examples=300)
@given(
    st.lists(st.binary(min_size=1, max_size=64), max_size=8),
    st.booleans(),
    st.integers(min_value=1, max_value=256),
)
def test_fuzz_arbitrary_bytes(chunks: list[bytes], eof: bool, max_reply_bytes: int) -> None:
    _drain(chunks, eof, max_reply_bytes)


KNOWN_KEYS = [
    "private_key",
    "listen_port",
    "fwmark",
    "public_key",
    "preshared_key",
    "protocol_version",
    "endpoint",
    "last_handshake_time_sec",
    "last_handshake_time_nsec",
    "tx_bytes",
    "rx_bytes",
    "persistent_keepalive_interval",
    "allowed_ip",
    "errno",
    "future_key",
]
PLAUSIBLE_VALUES = st.one_of(
    st.sampled_from(
        [
            "0",
            "-22",
            "1",
            "65536",
            "18446744073709551616",
            ZERO_HEX,
            PEER_A.hex(),
            PEER_B.hex(),
            "1.2.3.4:51820",
            "[::1]:51820",
            "[fe80::1%lo]:1",
            "10.0.0.0/8",
            "fd00::/8",
            "",
            "=",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=80),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
)
plausible_lines = st.lists(
    st.tuples(st.sampled_from(KNOWN_KEYS), PLAUSIBLE_VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
    max_size=20,
)


@settings(max_examples=300)
@given(plausible_lines, st.integers(min_value=1, max_value=40))
def test_fuzz_plausible_lines(lines: list[str], chunk_size: int) -> None:
    data = ("\n".join(lines) + "\n\n").encode()
    chunks = [data[start : start + chunk_size] for start in range(0, len(data), chunk_size)]
    _drain(chunks, eof=True, max_reply_bytes=1 << 20)


def test_update_in_place_removes_only_stale_peers_and_keeps_the_others() -> None:
    keep, stale = bytes([1]) * 32, bytes([2]) * 32
    config = DeviceConfig(private_key=bytes([9]) * 32, peers=(PeerConfig(public_key=keep),))
    text = encode_set(config, present_peers=[keep, stale]).decode()
    assert "replace_peers" not in text
    assert f"public_key={stale.hex()}\nremove=true\n" in text
    assert f"public_key={keep.hex()}\nremove" not in text
    assert text.count("remove=true") == 1
