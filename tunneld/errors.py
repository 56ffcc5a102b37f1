"""The one error hierarchy of tunneld.

Foreign exceptions (OSError, NetlinkError, tomllib.TOMLDecodeError, ...) are translated into
these at module boundaries, so callers — above all the CLI, which maps them to exit codes —
deal with one family. Every error a user can cause says what to do about it.
"""

from __future__ import annotations


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


class UapiError(BackendError):
    """The userspace implementation answered a UAPI request with ``errno=N``."""

    def __init__(self, errno: int, operation: str) -> None:
        self.errno = errno
        self.operation = operation
        super().__init__(f"userspace WireGuard refused {operation} (errno={errno})")


class UapiProtocolError(BackendError):
    """The UAPI peer sent something that is not the UAPI text protocol."""
