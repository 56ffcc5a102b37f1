"""Checks made before anything touches the network: privilege and one owner per interface.

Two tunnelds managing the same interface would undo each other's work (each replaces the other's
userspace device as "left behind"), so ``run`` holds an exclusive ``flock`` on
``/run/tunneld/IFNAME.lock`` for its lifetime; ``up`` and ``down`` take it briefly so they cannot
pull the interface from under a running daemon. The kernel drops the lock when the process dies,
even by ``kill -9``, so a stale lock file never blocks a restart.

Capabilities: ``run``, ``up`` and ``down`` first make every *permitted* capability effective.
A container runtime grants a non-root user no ambient capabilities, so in the container image
(deploy/docker) what it grants reaches tunneld through file capabilities of its interpreter, set
permitted-only (``=p``): with the effective bit the kernel would refuse to run the interpreter at
all wherever fewer are granted, even for ``tunneld genkey``. As root, or with systemd's
``AmbientCapabilities=``, they are effective already and this changes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from tunneld.errors import PermissionError_, TunneldError

LOCK_DIRECTORY = Path("/run/tunneld")
_CAP_NET_ADMIN = 12
_LINUX_CAPABILITY_VERSION_3 = 0x20080522  # capget(2)/capset(2): two 32-bit words per set


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


class AlreadyRunningError(TunneldError):
    """Another tunneld process manages this interface."""


def has_net_admin(status_path: Path = Path("/proc/self/status")) -> bool:
    """Whether this process holds CAP_NET_ADMIN in its effective set."""
    try:
        for line in status_path.read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


def raise_permitted_capabilities() -> None:
    """Make the permitted capabilities effective; on any failure, change nothing.

    Capabilities belong to a thread: call this from the main thread before any other thread is
    started (threads started later inherit them), as ``run``, ``up`` and ``down`` do.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        return
    if all(word.effective == word.permitted for word in data):
        return
    for word in data:
        word.effective = word.permitted
    libc.capset(ctypes.byref(header), data)  # may fail only if the kernel forbids it: checked next


def require_net_admin() -> None:
    """Make CAP_NET_ADMIN effective if it is permitted; raise PermissionError_ if it is not."""
    if not has_net_admin():
        raise_permitted_capabilities()
    if not has_net_admin():
        raise PermissionError_(
            "tunneld needs CAP_NET_ADMIN to create and configure the WireGuard interface: run it "
            "as root, or grant the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN; "
            "docker: --cap-add NET_ADMIN)"
        )


@contextlib.contextmanager
def interface_lock(ifname: str, directory: Path = LOCK_DIRECTORY) -> Iterator[None]:
    """Hold the exclusive lock on ``ifname`` for the duration of the context."""
    path = directory / f"{ifname}.lock"
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise TunneldError(f"{path}: cannot create the interface lock: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise AlreadyRunningError(
                f"interface {ifname} is managed by another tunneld (pid {holder}); stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def running_daemon_pid(ifname: str, directory: Path = LOCK_DIRECTORY) -> int | None:
    """The pid of the tunneld that holds ``ifname``'s lock, or None if none does."""
    path = directory / f"{ifname}.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TunneldError(f"{path}: cannot read the interface lock: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a daemon runs, and wrote its pid there
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        return None  # nobody holds it: a stale file from a daemon that has gone
    finally:
        os.close(fd)
