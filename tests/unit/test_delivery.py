"""Reading unacknowledged bytes from /proc/net/tcp{,6} lines (the drain's last wait)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from tunneld.proxy.delivery import parse_proc_address, unacknowledged_bytes

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1590 1
   1: 02002C0A:0050 01002C0A:D1C2 04 00000400:00000000 01:00000014 00000000     0        0 0 3
   2: 0100007F:1F91 0100007F:9C40 01 00000010:00000000 00:00000000 00000000     0        0 77 1
"""


def test_ipv4_addresses_are_read_in_host_byte_order() -> None:
    assert parse_proc_address("0100007F") == ipaddress.ip_address("127.0.0.1")
    assert parse_proc_address("02002C0A") == ipaddress.ip_address("10.44.0.2")


def test_ipv6_addresses_are_four_host_order_words() -> None:
    assert parse_proc_address("000044FD000000000000000002000000") == ipaddress.ip_address("fd44::2")


def test_the_parser_agrees_with_the_kernel_for_a_real_socket() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        ours = [row for row in rows if int(row[1].partition(":")[2], 16) == port]
        assert [parse_proc_address(row[1].partition(":")[0]) for row in ours] == [
            ipaddress.ip_address("127.0.0.1")
        ]


def test_only_sockets_on_the_given_addresses_count() -> None:
    tunnel = {ipaddress.ip_address("10.44.0.2"), ipaddress.ip_address("fd44::2")}
    assert unacknowledged_bytes(TCP.splitlines(), tunnel) == 0x400  # not the loopback socket
    lines6 = [
        "  sl  local_address remote_address st tx_queue rx_queue",
        "   0: 000044FD000000000000000002000000:0050 000044FD000000000000000001000000:C350 "
        "01 00000020:00000000",
    ]
    assert unacknowledged_bytes(lines6, tunnel) == 0x20
    assert unacknowledged_bytes(TCP.splitlines(), set()) == 0


def test_garbage_addresses_are_refused() -> None:
    with pytest.raises(ValueError):
        parse_proc_address("0100")
