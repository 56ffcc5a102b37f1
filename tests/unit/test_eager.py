"""EagerSocketStream over real sockets: the stream contract trio's SocketStream keeps, and the
two guarantees it keeps without yielding on every operation (cancellation, fairness)."""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from tunneld.proxy import eager
from tunneld.proxy.eager import EagerSocketStream


def pair() -> tuple[EagerSocketStream, EagerSocketStream]:
    a, b = socket.socketpair()
    return EagerSocketStream(a), EagerSocketStream(b)


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[EagerSocketStream, EagerSocketStream]]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = await eager.connect(socket.AF_INET, listener.getsockname())
        server, _ = listener.accept()
        accepted = EagerSocketStream(server)
        try:
            yield client, accepted
        finally:
            await client.aclose()
            await accepted.aclose()


async def test_bytes_both_ways_then_eof() -> None:
    a, b = pair()
    await a.send_all(b"hello")
    assert await b.receive_some(100) == b"hello"
    await b.send_all(b"back")
    assert await a.receive_some() == b"back"
    await a.send_eof()
    await a.send_eof()  # a second EOF is a no-op, as for trio's streams
    assert await b.receive_some() == b""
    await b.send_all(b"still open this way")  # half-closed: the other direction carries on
    assert await a.receive_some() == b"still open this way"
    with pytest.raises(trio.ClosedResourceError, match="after sending EOF"):
        await a.send_all(b"x")
    await a.aclose()
    await b.aclose()


async def test_tcp_sockets_get_nodelay_and_a_notsent_bound() -> None:
    async with tcp_pair() as (client, accepted):
        for stream in (client, accepted):
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            notsent = stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
            assert notsent == 128 * 1024
            assert not stream.socket.getblocking()


async def test_a_receive_waits_for_data() -> None:
    a, b = pair()
    async with trio.open_nursery() as nursery:
        received: list[bytes] = []

        async def receive() -> None:
            received.append(await b.receive_some())

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        assert received == []
        await a.send_all(b"late")
    assert received == [b"late"]
    await a.aclose()
    await b.aclose()


async def test_a_large_send_waits_for_the_reader() -> None:
    """More than the socket buffers hold: send_all finishes only as the peer reads."""
    a, b = pair()
    payload = bytes(range(256)) * 40_000  # 10 MB
    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(payload):
            received.extend(await b.receive_some(65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await a.send_all(payload)
    assert bytes(received) == payload
    await a.aclose()
    await b.aclose()


async def test_a_reset_is_a_broken_resource() -> None:
    async with tcp_pair() as (client, accepted):
        # SO_LINGER 0: close() sends a reset instead of a FIN.
        accepted.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        accepted.socket.close()
        with pytest.raises(trio.BrokenResourceError) as caught:
            for _ in range(100):  # the reset may need a moment to arrive
                await client.send_all(b"x" * 65536)
                await trio.sleep(0.01)
        assert isinstance(caught.value.__cause__, OSError)


async def test_close_wakes_a_waiting_task_with_closed_resource() -> None:
    a, b = pair()
    raised: list[BaseException] = []

    async def receive() -> None:
        try:
            await b.receive_some()
        except trio.ClosedResourceError as exc:
            raised.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        await b.aclose()
    assert len(raised) == 1
    with pytest.raises(trio.ClosedResourceError):
        await b.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await b.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await b.wait_send_all_might_not_block()
    await b.aclose()  # closing twice is fine
    await a.aclose()


async def test_a_cancelled_task_stops_even_when_the_operation_would_not_wait() -> None:
    a, b = pair()
    await a.send_all(b"ready")
    with trio.CancelScope() as scope:
        scope.cancel()
        await b.receive_some()
    assert scope.cancelled_caught
    assert await b.receive_some() == b"ready"  # nothing was consumed by the cancelled call
    with trio.CancelScope() as scope:
        scope.cancel()
        await a.send_all(b"not sent")
    assert scope.cancelled_caught
    await a.send_eof()
    assert await b.receive_some() == b""
    await a.aclose()
    await b.aclose()


async def test_receives_that_never_wait_still_let_other_tasks_run() -> None:
    """Draining an always-ready socket must not starve the loop: another task gets to run
    within two rounds of YIELD_EVERY receives (trio may run the yielding task first in the
    next batch, as it randomises the order of each batch)."""
    a, b = pair()
    await a.send_all(b"x" * 1000)
    ran_after: list[int] = []
    receives = 0

    async def other() -> None:
        ran_after.append(receives)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for receives in range(1, 1000):  # noqa: B007 (read by other())
            assert await b.receive_some(1) == b"x"
            if ran_after:
                break
        ran_within_the_loop = list(ran_after)  # (the nursery's exit would let it run anyway)
    assert ran_within_the_loop, "the other task never ran while the loop was busy"
    assert ran_within_the_loop[0] <= 2 * eager.YIELD_EVERY
    await a.aclose()
    await b.aclose()


async def test_every_send_is_a_schedule_point() -> None:
    """The peer's answer gets its moment (module docstring): a send that did not wait still
    goes through the scheduler, as trio's own sends do."""
    a, b = pair()
    for _ in range(3):
        with trio.testing.assert_checkpoints():
            await a.send_all(b"x")
    assert await b.receive_some() == b"xxx"
    await a.aclose()
    await b.aclose()


async def test_connect_refused_is_an_oserror_with_its_errno() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = unused.getsockname()  # bound, not listening: refused
        with pytest.raises(OSError) as caught:
            await eager.connect(socket.AF_INET, address)
    assert caught.value.errno == errno.ECONNREFUSED


async def test_connect_to_a_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "origin.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        client = await eager.connect(socket.AF_UNIX, path)
        server, _ = listener.accept()
        with server:
            await client.send_all(b"over unix")
            assert server.recv(100) == b"over unix"
        await client.aclose()
    with pytest.raises(OSError) as caught:
        await eager.connect(socket.AF_UNIX, str(tmp_path / "nobody.sock"))
    assert caught.value.errno == errno.ENOENT


async def test_is_readable_tells_an_idle_connection_from_a_closed_one() -> None:
    a, b = pair()
    assert not a.is_readable()
    await b.aclose()
    assert a.is_readable()  # EOF is readable: a pooled connection the origin closed
    await a.aclose()
    assert not a.is_readable()


async def test_from_trio_takes_over_the_socket() -> None:
    a, b = trio.socket.socketpair()
    stream = EagerSocketStream.from_trio(trio.SocketStream(a))
    await b.send(b"via trio")
    assert await stream.receive_some() == b"via trio"
    await stream.aclose()
    assert await b.recv(10) == b""
    b.close()
