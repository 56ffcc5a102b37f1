"""Sockets inside a network namespace, from the test process itself.

``setns(2)`` switches only the calling OS thread, and a socket stays in the namespace it was
created in. So a short-lived thread enters the namespace, creates the socket and exits; the test
then uses the socket from anywhere, with ordinary blocking code — no subprocess per request.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import socket
import threading

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def socket_in(
    namespace: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    result: dict[str, object] = {}

    def create() -> None:
        fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                error = ctypes.get_errno()
                raise OSError(error, f"setns({namespace}): {os.strerror(error)}")
            result["socket"] = socket.socket(family, kind)
        except BaseException as exc:  # handed to the caller's thread below
            result["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["socket"]  # type: ignore[return-value]


def connect(namespace: str, address: str, port: int, timeout: float = 10.0) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket_in(namespace, family)
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


class HTTPConnection(http.client.HTTPConnection):
    """``http.client`` whose connection is made from inside ``namespace``."""

    def __init__(self, namespace: str, host: str, port: int = 80, timeout: float = 10.0) -> None:
        super().__init__(host, port, timeout=timeout)
        self.namespace = namespace

    def connect(self) -> None:
        self.sock = connect(self.namespace, self.host, self.port, self.timeout or 10.0)  # type: ignore[arg-type]
