"""The netlink thread: one thread for every call, handles kept, and dropped after socket errors."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from pyroute2 import NetlinkError

from tunneld.errors import BackendError
from tunneld.wireguard import netlink_thread

TIMEOUT = 10


class FakeHandle:
    made: list[FakeHandle] = []  # noqa: RUF012

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.thread = threading.get_ident()
        self.closed = False
        FakeHandle.made.append(self)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_handles(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeHandle]]:
    made: list[FakeHandle] = []
    monkeypatch.setattr(FakeHandle, "made", made)
    monkeypatch.setattr(netlink_thread, "IPRoute", FakeHandle)
    monkeypatch.setattr(netlink_thread, "WireGuard", FakeHandle)

    async def drop() -> None:
        await netlink_thread.run_sync(netlink_thread.discard_handles)

    trio.run(drop)
    yield made
    trio.run(drop)


async def test_every_call_runs_in_the_same_thread_one_at_a_time(
    fake_handles: list[FakeHandle],
) -> None:
    threads: set[int] = set()
    running = 0
    most = 0
    lock = threading.Lock()

    def call() -> Any:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        threads.add(threading.get_ident())
        handle = netlink_thread.iproute()
        with lock:
            running -= 1
        return handle

    with trio.fail_after(TIMEOUT):
        handles: list[Any] = []

        async def one() -> None:
            handles.append(await netlink_thread.run_sync(call))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
        # and again later, after trio's own worker threads came and went
        await trio.to_thread.run_sync(lambda: None)
        handles.append(await netlink_thread.run_sync(call))
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert most == 1
    assert len(fake_handles) == 1 and all(handle is fake_handles[0] for handle in handles)
    assert fake_handles[0].options == {"groups": 0}  # no multicast: nothing queues up unasked


async def test_results_and_errors_come_back(fake_handles: list[FakeHandle]) -> None:
    def fail() -> None:
        raise NetlinkError(errno.ENODEV, "No such device")

    with trio.fail_after(TIMEOUT):
        assert await netlink_thread.run_sync(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(NetlinkError):
            await netlink_thread.run_sync(fail)


async def test_a_kernel_refusal_keeps_the_handles_a_socket_error_drops_them(
    fake_handles: list[FakeHandle],
) -> None:
    def refused() -> None:
        netlink_thread.wireguard()
        raise BackendError("refused") from NetlinkError(errno.EINVAL, "Invalid argument")

    def broken() -> None:
        netlink_thread.wireguard()
        raise BackendError("socket failed") from OSError(errno.EBADF, "Bad file descriptor")

    with trio.fail_after(TIMEOUT):
        with pytest.raises(BackendError):
            await netlink_thread.run_sync(refused)
        assert len(fake_handles) == 1 and not fake_handles[0].closed
        with pytest.raises(BackendError):
            await netlink_thread.run_sync(broken)
        assert fake_handles[0].closed
        await netlink_thread.run_sync(netlink_thread.wireguard)
    assert len(fake_handles) == 2


async def test_a_cancelled_caller_waits_for_its_started_call(
    fake_handles: list[FakeHandle],
) -> None:
    release = threading.Event()
    finished: list[bool] = []

    def slow() -> None:
        release.wait(TIMEOUT)
        finished.append(True)

    timer = threading.Timer(0.3, release.set)
    timer.start()
    try:
        with trio.fail_after(TIMEOUT), trio.move_on_after(0.05) as scope:
            await netlink_thread.run_sync(slow)
    finally:
        timer.cancel()
    assert scope.cancelled_caught
    assert finished == [True]  # the call ran to its end before the cancellation was delivered


def test_real_pyroute2_handles_open_no_descriptor_per_call() -> None:
    """Against the kernel: after the first call, more calls open nothing (loopback exists in
    every namespace; reading it needs no privilege)."""

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def main() -> tuple[int, int]:
        with trio.fail_after(TIMEOUT):
            await netlink_thread.run_sync(lambda: netlink_thread.iproute().link_lookup(ifname="lo"))
            before = fds()
            for _ in range(50):
                await netlink_thread.run_sync(
                    lambda: netlink_thread.iproute().link_lookup(ifname="lo")
                )
            return before, fds()

    before, after = trio.run(main)
    trio.run(netlink_thread.run_sync, netlink_thread.discard_handles)
    assert after == before
