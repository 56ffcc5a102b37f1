"""tunneld's CLI run inside a network namespace, forked from a process that imported it once.

Why not ``ip netns exec NS python -m tunneld``: under TCG the emulated CPU interprets Python's
start-up — importing trio, pyroute2 and cryptography takes 10 to 20 s per process in the VM — so a
dozen runs would blow the suite's time budget. Instead a multiprocessing *forkserver* imports
``tunneld.cli`` once; every run is a fork of that clean, single-threaded server that enters the
namespace with ``setns(2)``, points fds 1 and 2 at files and calls ``tunneld.cli.main(argv)``:
the console script's own code path after its imports. The daemon is a real process with its own
pid, so SIGTERM and ``kill -9`` mean what they mean in production.

:class:`ForkedProcess` offers the part of ``subprocess.Popen`` that the topology uses (``pid``,
``poll``, ``wait``, ``send_signal``, ``kill``, ``returncode``), so ``Topology.close`` tears it
down like any other child. :func:`call` runs any importable function the same way (for the
netlink seam itself) and brings back its result or the exception it raised.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

_CLONE_NEWNET = 0x40000000
_CAP_NET_ADMIN = 12
_PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["tunneld.cli"])


def enter_namespace(namespace: str) -> None:
    """Move the calling thread into the network namespace ``ip netns add`` named."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns({namespace}): {os.strerror(error)}")
    finally:
        os.close(fd)


def drop_net_admin() -> None:
    """Remove CAP_NET_ADMIN from this process for good (bounding, effective, permitted sets)."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # {effective, permitted, inheritable} x 2 words
    if libc.prctl(_PR_CAPBSET_DROP, _CAP_NET_ADMIN, 0, 0, 0) != 0 or libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "dropping CAP_NET_ADMIN")
    for word in range(3):
        data[word] &= ~(1 << _CAP_NET_ADMIN) & 0xFFFFFFFF
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "dropping CAP_NET_ADMIN")


def _enter(namespace: str | None, without_net_admin: bool) -> None:
    if namespace is not None:
        enter_namespace(namespace)  # needs CAP_SYS_ADMIN: before the drop
    if without_net_admin:
        drop_net_admin()


def _cli_main(
    namespace: str | None,
    without_net_admin: bool,
    argv: list[str],
    stdout: str,
    stderr: str,
    env: dict[str, str],
) -> None:
    """The forked child: namespace, output files, environment, then tunneld's ``main``."""
    _enter(namespace, without_net_admin)
    for target_fd, path in ((1, stdout), (2, stderr)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, target_fd)
        os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.update(env)
    from tunneld import cli

    code = cli.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class ForkedProcess:
    """A running ``tunneld`` command; the ``subprocess.Popen`` subset the topology needs."""

    stdout = None  # output goes to files, never to a pipe

    def __init__(self, process: multiprocessing.process.BaseProcess, argv: list[str]) -> None:
        self._process = process
        self.args = argv
        assert process.pid is not None
        self.pid: int = process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start(
    namespace: str | None,
    argv: list[str],
    *,
    stdout: Path,
    stderr: Path | None = None,
    env: Mapping[str, str] | None = None,
    without_net_admin: bool = False,
) -> ForkedProcess:
    """Start ``tunneld ARGV`` in ``namespace`` (None: the VM's own), output appended to files."""
    process = _context.Process(
        target=_cli_main,
        args=(
            namespace,
            without_net_admin,
            list(argv),
            str(stdout),
            str(stderr or stdout),
            dict(env or {}),
        ),
        name=f"tunneld {' '.join(argv)}",
    )
    process.start()
    return ForkedProcess(process, ["tunneld", *argv])


def run(
    namespace: str | None,
    argv: list[str],
    *,
    workdir: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    without_net_admin: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``tunneld ARGV`` to completion; stdout and stderr come back separately."""
    stdout, stderr = (workdir / f".cli-{os.getpid()}-{name}" for name in ("out", "err"))
    for path in (stdout, stderr):
        path.write_text("")
    process = start(
        namespace, argv, stdout=stdout, stderr=stderr, env=env, without_net_admin=without_net_admin
    )
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise AssertionError(
            f"tunneld {' '.join(argv)} did not finish within {timeout:g}s:\n"
            + stderr.read_text(errors="replace")
        ) from None
    result = subprocess.CompletedProcess(
        ["tunneld", *argv],
        code,
        stdout.read_text(errors="replace"),
        stderr.read_text(errors="replace"),
    )
    stdout.unlink()
    stderr.unlink()
    return result


@dataclass(frozen=True)
class Outcome:
    """What a :func:`call` came back with: a value, or the name and text of what it raised."""

    value: Any = None
    raised: str | None = None
    message: str = ""


def _call_child(
    connection: Connection,
    namespace: str | None,
    without_net_admin: bool,
    function: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    try:
        _enter(namespace, without_net_admin)
        outcome = Outcome(value=function(*args, **kwargs))
    except Exception as exc:
        outcome = Outcome(raised=type(exc).__name__, message=str(exc))
    connection.send(outcome)
    connection.close()


def call(
    namespace: str | None,
    function: Callable[..., Any],
    *args: Any,
    without_net_admin: bool = False,
    timeout: float = 60.0,
    **kwargs: Any,
) -> Outcome:
    """``function(*args, **kwargs)`` in a forked child inside ``namespace``.

    ``function`` must be importable by name (pickled by reference) and its result picklable.
    """
    receiver, sender = _context.Pipe(duplex=False)
    process = _context.Process(
        target=_call_child,
        args=(sender, namespace, without_net_admin, function, args, kwargs),
        name=f"call {function.__qualname__}",
    )
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            process.kill()
            raise AssertionError(f"{function.__qualname__}{args} gave no answer in {timeout:g}s")
        outcome: Outcome = receiver.recv()
    finally:
        receiver.close()
        process.join(10)
    return outcome
