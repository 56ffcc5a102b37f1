"""sd_notify against a real unix datagram receiver; watchdog timing on trio's autojump clock."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from tunneld import systemd
from tunneld.systemd import Notifier, run_watchdog


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 108-byte limit of a unix socket path.
    with tempfile.TemporaryDirectory(prefix="sdn-", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture
def receiver(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and its ``$NOTIFY_SOCKET`` value."""
    path = short_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fspath(path))
        sock.setblocking(False)
        yield sock, os.fspath(path)


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``, decoded."""
    messages = []
    while True:
        try:
            messages.append(sock.recv(65536).decode())
        except BlockingIOError:
            return messages


def test_path_socket_gets_ready_with_status(receiver: tuple[socket.socket, str]) -> None:
    sock, notify_socket = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_socket})
    assert notifier.enabled
    notifier.ready("up: edge-1 handshake 3s ago; 2 services")
    assert received(sock) == ["READY=1\nSTATUS=up: edge-1 handshake 3s ago; 2 services"]


def test_abstract_socket_name_gets_a_leading_nul() -> None:
    name = f"tunneld-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.address == b"\0" + name.encode()
        notifier.stopping("draining 3 connections")
        assert received(sock) == ["STOPPING=1\nSTATUS=draining 3 connections"]


def test_status_newlines_are_flattened_and_repeats_not_resent(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, notify_socket = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_socket})
    notifier.status("degraded: edge-1\nno handshake\r\nfor 200s\n")
    notifier.status("degraded: edge-1 no handshake for 200s")  # the same line: not sent again
    notifier.status("up")
    assert received(sock) == ["STATUS=degraded: edge-1 no handshake for 200s", "STATUS=up"]


def test_reload_sends_reloading_with_the_monotonic_clock_then_ready(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, notify_socket = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_socket})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.ready_after_reload("up; config reloaded")
    reloading, ready = received(sock)
    first, second = reloading.split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert ready == "READY=1\nSTATUS=up; config reloaded"


def test_without_notify_socket_everything_is_a_silent_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_socket(*args: object) -> socket.socket:
        raise AssertionError("no socket may be opened without NOTIFY_SOCKET")

    monkeypatch.setattr(systemd.socket, "socket", no_socket)
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_seconds() is None
    notifier.ready("up")
    notifier.status("up")
    notifier.reloading()
    notifier.ready_after_reload()
    notifier.stopping()
    notifier.watchdog()


def test_watchdog_interval_is_half_of_watchdog_usec(receiver: tuple[socket.socket, str]) -> None:
    sock, notify_socket = receiver
    for pid in ({}, {"WATCHDOG_PID": str(os.getpid())}):
        notifier = Notifier.from_environ(
            {"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "30000000", **pid}
        )
        assert notifier.watchdog_interval_seconds() == 15.0
        notifier.watchdog()
        assert received(sock) == ["WATCHDOG=1"]


def test_watchdog_meant_for_another_pid_is_not_ours(receiver: tuple[socket.socket, str]) -> None:
    sock, notify_socket = receiver
    notifier = Notifier.from_environ(
        {"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
    )
    assert notifier.watchdog_interval_seconds() is None
    notifier.watchdog()
    notifier.ready()  # the notify socket itself is still ours
    assert received(sock) == ["READY=1"]


@pytest.mark.parametrize("usec", ["", "0", "-5", "thirty", "1.5"])
def test_unusable_watchdog_usec_means_no_watchdog(usec: str) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": usec}
    assert Notifier.from_environ(env).watchdog_interval_seconds() is None


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/path", "@"])
def test_unsupported_socket_addresses_disable_notification(value: str) -> None:
    assert not Notifier.from_environ({"NOTIFY_SOCKET": value}).enabled


def test_unset_environment_keeps_the_variables_from_children() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1", "PATH": "/bin"}
    notifier = Notifier.from_environ(env, unset_environment=True)
    assert notifier.enabled
    assert env == {"PATH": "/bin"}


def test_a_vanished_receiver_is_logged_once_and_never_raises(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = short_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fspath(path))
    # Closed but the file is still there (ECONNREFUSED), then the file gone too (ENOENT).
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": os.fspath(path)})
    caplog.set_level(logging.DEBUG, logger="tunneld.systemd")
    notifier.ready("up")
    path.unlink()
    notifier.status("still up")
    notifier.stopping()
    failures = [record for record in caplog.records if "sd_notify" in record.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.DEBUG


def test_a_full_receiver_never_blocks_or_raises(receiver: tuple[socket.socket, str]) -> None:
    sock, notify_socket = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "1000000"})

    def flood() -> None:
        for _ in range(5000):  # far beyond net.unix.max_dgram_qlen (10 by default)
            notifier.watchdog()

    # In a thread, so that a send that blocks fails the test instead of hanging it.
    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(timeout=10)
    assert not sender.is_alive(), "a notification blocked on a full receiver"
    assert 0 < len(received(sock)) < 5000
    notifier.status("drained")  # sending works again once there is room
    assert received(sock) == ["STATUS=drained"]


def test_undelivered_status_is_sent_again(short_dir: Path) -> None:
    path = short_dir / "notify"
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": os.fspath(path)})
    notifier.status("up")  # nobody listens yet
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fspath(path))
        sock.setblocking(False)
        notifier.status("up")
        assert received(sock) == ["STATUS=up"]


async def test_watchdog_pings_stop_while_the_loop_is_wedged_and_resume_after(
    receiver: tuple[socket.socket, str],
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sock, notify_socket = receiver
    # WatchdogSec=10s: ping every 5 s; the loop counts as wedged after 20 s without a tick.
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "10000000"})
    last_tick = trio.current_time()
    wedged = False

    async def supervisor() -> None:
        nonlocal last_tick
        while True:
            await trio.sleep(2)
            if not wedged:
                last_tick = trio.current_time()

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor)
            progress = lambda: last_tick  # noqa: E731
            await nursery.start(partial(run_watchdog, notifier, progress, stall_after_seconds=20))
            await trio.sleep(29)  # healthy, e.g. through a network outage: the loop still ticks
            assert received(sock) == ["WATCHDOG=1"] * 6  # at 0, 5, ..., 25 s

            wedged = True
            await trio.sleep(20 + 5 + 1)  # stall_after plus one ping interval: pings have stopped
            received(sock)
            await trio.sleep(30)
            assert received(sock) == []
            assert any("no progress" in record.getMessage() for record in caplog.records)

            wedged = False
            await trio.sleep(2 + 5 + 1)  # the next tick, then at most one ping interval
            assert received(sock) != []
            nursery.cancel_scope.cancel()


async def test_watchdog_task_ends_at_once_when_systemd_does_not_watch(
    receiver: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    sock, notify_socket = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_socket})  # no WATCHDOG_USEC
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_watchdog, notifier, trio.current_time)
    assert received(sock) == []
