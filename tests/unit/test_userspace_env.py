"""The userspace WireGuard child's environment: exactly what it needs, nothing inherited.

wireguard-go reads LOG_LEVEL (pinned to "error": its verbose mode logs every keepalive, and
older versions default to "info"), and WG_TUN_FD / WG_UAPI_FD / WG_PROCESS_FOREGROUND, which
only its own daemonizing re-exec may set (they would make it adopt file descriptors it was not
given). It execs nothing, so it needs no PATH: the binary is resolved before it starts.
tests/integration/test_tunnel.py reads the real child's /proc/PID/environ.
"""

from __future__ import annotations

import pytest

from tunneld.wireguard import userspace


def test_the_child_gets_log_level_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "PATH": "/usr/bin:/bin",
        "WG_TUN_FD": "3",
        "WG_UAPI_FD": "4",
        "WG_PROCESS_FOREGROUND": "1",
        "LOG_LEVEL": "debug",
        "TUNNELD_LOG_LEVEL": "debug",
        "CREDENTIALS_DIRECTORY": "/run/credentials/tunneld.service",
    }.items():
        monkeypatch.setenv(name, value)
    assert userspace.child_environment() == {"LOG_LEVEL": "error"}
