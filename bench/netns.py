"""Sockets opened inside a network namespace, from the harness process itself.

``setns(2)`` switches only the calling OS thread and a socket stays in the namespace it was made
in, so a short-lived thread enters the namespace and creates the socket; the harness then uses it
with ordinary blocking code (readiness checks, a scrape of tunneld's /metrics).
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def socket_in(namespace: str) -> socket.socket:
    result: dict[str, socket.socket | BaseException] = {}

    def create() -> None:
        fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) == 0:
                result["socket"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            else:
                error = ctypes.get_errno()
                result["socket"] = OSError(error, f"setns({namespace}): {os.strerror(error)}")
        except OSError as exc:  # handed to the caller's thread below
            result["socket"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    created = result["socket"]
    if isinstance(created, BaseException):
        raise created
    return created


def http_get(
    namespace: str,
    address: str,
    port: int,
    path: str = "/",
    host: str = "bench",
    timeout: float = 3,
) -> tuple[int, bytes]:
    """One HTTP/1.0-style GET (``Connection: close``) from inside ``namespace``: (status, body)."""
    sock = socket_in(namespace)
    try:
        sock.settimeout(timeout)
        sock.connect((address, port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    response = b"".join(chunks)
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError(f"not an HTTP response from {address}:{port}: {response[:80]!r}")
    return int(status_line[1]), body


def can_connect(namespace: str, address: str, port: int, timeout: float = 2) -> bool:
    sock = socket_in(namespace)
    try:
        sock.settimeout(timeout)
        sock.connect((address, port))
    except OSError:
        return False
    finally:
        sock.close()
    return True
