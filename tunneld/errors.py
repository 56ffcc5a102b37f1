"""The one error hierarchy of tunneld.

Foreign exceptions (OSError, NetlinkError, tomllib.TOMLDecodeError, ...) are translated into
these at module boundaries, so callers — above all the CLI, which maps them to exit codes —
deal with one family. Every error a user can cause says what to do about it.
"""

from __future__ import annotations

import trio


class TunneldError(Exception):
    """Base of every error tunneld raises on purpose."""

    #: Process exit code when this error ends the program (see ``cli.py``).
    exit_code = 1


class ConfigError(TunneldError):
    """The configuration is invalid. Carries every problem found, one per line."""

    exit_code = 2

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class KeyFileError(TunneldError):
    """A key file is missing, unreadable, malformed or too widely readable."""

    exit_code = 2


class PermissionError_(TunneldError):
    """We lack a privilege (root / CAP_NET_ADMIN) that the operation needs."""

    exit_code = 2


class BackendError(TunneldError):
    """The WireGuard backend (kernel netlink or userspace process) failed."""


class BackendUnavailableError(BackendError):
    """No usable WireGuard implementation: the fix is to install one."""

    exit_code = 2


class FirewallError(TunneldError):
    """The nftables filter on the WireGuard interface could not be read or written."""


class FirewallUnavailableError(FirewallError):
    """No nftables to filter with (library or kernel support missing): a person must install it."""

    exit_code = 2


class UapiError(BackendError):
    """The userspace implementation answered a UAPI request with ``errno=N``."""

    def __init__(self, errno: int, operation: str) -> None:
        self.errno = errno
        self.operation = operation
        super().__init__(f"userspace WireGuard refused {operation} (errno={errno})")


class UapiProtocolError(BackendError):
    """The UAPI peer sent something that is not the UAPI text protocol."""


def principal_error(exc: BaseException) -> TunneldError | None:
    """The TunneldError that ``exc`` stands for, looking through trio's exception groups.

    A group counts when every exception in it is a TunneldError or a cancellation caused by one
    (sibling tasks being torn down); the first TunneldError is the one to report.
    """
    if isinstance(exc, TunneldError):
        return exc
    if not isinstance(exc, BaseExceptionGroup):
        return None
    found: TunneldError | None = None
    for inner in exc.exceptions:
        if isinstance(inner, trio.Cancelled):
            continue
        error = principal_error(inner)
        if error is None:
            return None
        found = found or error
    return found


class ProxyError(TunneldError):
    """Forwarding one request or connection failed; never fatal to anything else."""


class UpstreamError(ProxyError):
    """The origin could not be reached or misbehaved.

    ``kind`` is a short, bounded label for logs and metrics: ``refused``, ``timeout``,
    ``unreachable``, ``dns``, ``tls``, ``protocol`` or ``closed``.
    """

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)
