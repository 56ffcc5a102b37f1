"""The userspace backend: wireguard-go (or any UAPI-speaking binary) as a supervised child.

How this works: ``wireguard-go -f IFNAME`` creates a tun device named IFNAME and listens on
``/var/run/wireguard/IFNAME.sock``. We configure it and read its state over that socket with the
sans-IO codec in :mod:`tunneld.wireguard.uapi`: one connection per request, as ``wg`` does.

The child's environment is ``LOG_LEVEL=error`` alone (no secrets exist in ours, but we do not
rely on that) and its output is forwarded to our log. When our scope is cancelled trio sends it
SIGTERM and wireguard-go removes its device; if it wedges, SIGKILL follows and the kernel drops
the non-persistent tun anyway. A child left behind by a ``kill -9`` of the daemon is recognised
by its answering socket and replaced, so a restart always ends with a device we supervise.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from tunneld.errors import BackendError, BackendUnavailableError, PermissionError_, TunneldError
from tunneld.wireguard import uapi
from tunneld.wireguard.links import delete_link
from tunneld.wireguard.model import DeviceConfig, DeviceStats

log = logging.getLogger(__name__)

SOCKET_DIRECTORY = Path("/var/run/wireguard")
TUN_DEVICE = Path("/dev/net/tun")
UAPI_TIMEOUT_SECONDS = 5.0
STARTUP_TIMEOUT_SECONDS = 10.0
_OUTPUT_TAIL_LINES = 20


def socket_path(ifname: str) -> Path:
    return SOCKET_DIRECTORY / f"{ifname}.sock"


async def _uapi_request(ifname: str, request: bytes) -> list[tuple[str, str]]:
    path = socket_path(ifname)
    try:
        with trio.fail_after(UAPI_TIMEOUT_SECONDS):
            stream = await trio.open_unix_socket(os.fspath(path))
            async with stream:
                await stream.send_all(request)
                reader = uapi.ReplyReader()
                while (reply := reader.next_reply()) is None:
                    reader.receive_data(await stream.receive_some(65536))
                return reply
    except trio.TooSlowError:
        raise BackendError(f"{path}: no UAPI reply within {UAPI_TIMEOUT_SECONDS:g}s") from None
    except OSError as exc:
        raise BackendError(f"{path}: cannot talk to userspace WireGuard: {exc.strerror}") from exc
    except trio.BrokenResourceError as exc:  # it went away mid-answer (e.g. shutting down)
        raise BackendError(f"{path}: userspace WireGuard closed the connection: {exc}") from exc


class UserspaceDevice:
    """A WireGuard device run by a userspace implementation, driven over its UAPI socket."""

    backend_name = "userspace"

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname

    async def configure(self, config: DeviceConfig) -> None:
        """Make the device match ``config`` without disturbing sessions of peers that stay."""
        present = [peer.public_key for peer in (await self.stats()).peers]
        request = uapi.encode_set(config, present_peers=present)
        uapi.parse_set_reply(await _uapi_request(self.ifname, request))

    async def stats(self) -> DeviceStats:
        return uapi.parse_get_reply(await _uapi_request(self.ifname, uapi.encode_get()))


async def answers_uapi(ifname: str) -> bool:
    """Whether a userspace WireGuard implementation is serving ``ifname`` right now."""
    try:
        await UserspaceDevice(ifname).stats()
    except BackendError:  # includes UAPI errors: whatever answers is not a usable device
        return False
    return True


def find_binary(binary: str) -> str:
    """Resolve the configured binary on PATH, or say what to install."""
    found = shutil.which(binary)
    if found is None:
        raise BackendUnavailableError(
            f"the kernel has no WireGuard support and the userspace implementation {binary!r} "
            "was not found on PATH; install it (Debian/Ubuntu: apt-get install wireguard-go) "
            "or set [interface].userspace_binary to its path"
        )
    return found


def check_tun_device(path: Path = TUN_DEVICE) -> None:
    """Raise what a person must fix if this process cannot open the tun device.

    The implementation runs as our user and groups and opens ``path`` read-write before it asks
    for an interface, so our own open answers for it; opening the clone device creates nothing.
    Without this, a refusal looks like a child that dies at once, and the supervisor would
    rebuild for ever. The usual one: a host without udev keeps the kernel's ``crw-------`` root
    node, and container runtimes copy that mode into the container, where a non-root user with
    CAP_NET_ADMIN alone (no CAP_DAC_OVERRIDE) is refused.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BackendUnavailableError(
            f"{path} does not exist, and userspace WireGuard needs it: load the tun module "
            "(modprobe tun); in a container, pass the device (docker: --device /dev/net/tun)"
        ) from None
    except PermissionError as exc:
        if exc.errno == errno.EPERM:  # not the file's mode: the device cgroup, or an LSM
            raise PermissionError_(
                f"{path}: operation not permitted; allow the device to tunneld (docker: "
                "--device /dev/net/tun; systemd: DeviceAllow=/dev/net/tun rw)"
            ) from exc
        try:
            info = path.stat()
            node = f" ({stat.filemode(info.st_mode)} {info.st_uid}:{info.st_gid})"
        except OSError:
            node = ""
        raise PermissionError_(
            f"uid {os.geteuid()} cannot open {path}{node}, which userspace WireGuard needs "
            f"read-write: on the host, give it mode 0666 as udev does (chmod 0666 {path}); a "
            "container gets the host's mode"
        ) from exc
    os.close(fd)


def child_environment() -> dict[str, str]:
    """The child's whole environment: ``LOG_LEVEL=error`` and nothing else (README says so).

    Not built from ``os.environ``: the child inherits nothing it does not need. wireguard-go
    execs no program (the binary is resolved before it starts), so it needs no ``PATH``; and
    ``WG_TUN_FD``, ``WG_UAPI_FD``, ``WG_PROCESS_FOREGROUND`` are for its own daemonizing
    re-exec alone: inherited, they would make it adopt descriptors it was never given.
    """
    # Errors only, even when we log at debug (older wireguard-go defaults to info): its verbose
    # mode logs every keepalive, and a child that writes to its pipe after a kill -9 of ours
    # dies of SIGPIPE mid-cleanup instead of staying up for the restart to adopt or replace.
    return {"LOG_LEVEL": "error"}


def _explain_exit(binary: str, status: int, output: list[str]) -> TunneldError:
    tail = "; ".join(output[-5:]) or "no output"
    refusals = ("operation not permitted", "permission denied")  # EPERM, EACCES: not transient
    if any(refusal in line.lower() for line in output for refusal in refusals):
        return PermissionError_(
            f"{binary} was refused what it needs ({tail}); tunneld needs root or "
            f"CAP_NET_ADMIN, read-write access to {TUN_DEVICE}, and a writable {SOCKET_DIRECTORY}"
        )
    return BackendError(f"{binary} exited with status {status}: {tail}")


async def remove_stale_device(ifname: str) -> None:
    """Delete ``ifname`` and wait until its userspace implementation has stopped answering."""
    await delete_link(ifname)  # wireguard-go exits when its tun device goes away
    with trio.move_on_after(STARTUP_TIMEOUT_SECONDS):
        # Not "until the socket file is gone": an orphan whose log pipe died with our previous
        # run is killed by SIGPIPE mid-cleanup and leaves the file behind, unanswered.
        while await answers_uapi(ifname):  # noqa: ASYNC110 - nothing to wait on but the socket
            await trio.sleep(0.05)


def _is_banner(line: str) -> bool:
    """wireguard-go's boxed "the kernel module is better" banner, which we do not forward."""
    return not line or line[0] in "┌│└"


async def _forward_output(stream: trio.abc.ReceiveStream, binary: str, tail: list[str]) -> None:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if _is_banner(line):
                continue
            tail.append(line)
            del tail[:-_OUTPUT_TAIL_LINES]
            log.warning("%s: %s", Path(binary).name, line)


async def _wait_until_serving(
    ifname: str, binary: str, process: trio.Process | None, tail: list[str]
) -> None:
    """Poll the socket until it answers: the implementation gives no other readiness signal."""
    with trio.move_on_after(STARTUP_TIMEOUT_SECONDS):
        while not await answers_uapi(ifname):
            if process is not None and process.returncode is not None:
                raise _explain_exit(binary, process.returncode, tail)
            await trio.sleep(0.05)
        return
    raise BackendError(
        f"{binary} did not open {socket_path(ifname)} within {STARTUP_TIMEOUT_SECONDS:g}s"
    )


@asynccontextmanager
async def supervised_device(ifname: str, binary: str) -> AsyncIterator[UserspaceDevice]:
    """Run ``binary -f ifname`` for the lifetime of the context; yield its device.

    If the child dies while the context is open, :class:`BackendError` is raised into the body.
    """
    path = find_binary(binary)
    check_tun_device()
    tail: list[str] = []
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [path, "-f", ifname],
                env=child_environment(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                check=False,
            )
        )
        if process.stdout is not None:  # always, with stdout=PIPE
            nursery.start_soon(_forward_output, process.stdout, binary, tail)
        await _wait_until_serving(ifname, binary, process, tail)
        log.info("%s is serving %s (pid %d)", binary, ifname, process.pid)

        async def watch_child() -> None:
            status = await process.wait()
            raise _explain_exit(binary, status, tail)

        nursery.start_soon(watch_child)
        try:
            yield UserspaceDevice(ifname)
        finally:
            nursery.cancel_scope.cancel()  # SIGTERM → wireguard-go removes its device


async def start_detached(ifname: str, binary: str) -> UserspaceDevice:
    """Start ``binary ifname`` in its own daemonizing mode (for the one-shot ``tunneld up``)."""
    path = find_binary(binary)
    check_tun_device()
    # A file, not a pipe: the daemonized grandchild inherits our stdout and would hold a pipe
    # open for ever, so waiting for its EOF would never end.
    with tempfile.TemporaryFile() as output_file:
        result = await trio.run_process(
            [path, ifname],
            env=child_environment(),
            stdin=subprocess.DEVNULL,
            stdout=output_file,
            stderr=subprocess.STDOUT,
            check=False,
        )
        output_file.seek(0)
        output = output_file.read(65536).decode(errors="replace").splitlines()
    output = [line.strip() for line in output if not _is_banner(line.strip())]
    if result.returncode != 0:
        raise _explain_exit(binary, result.returncode, output)
    await _wait_until_serving(ifname, binary, None, output)
    return UserspaceDevice(ifname)
