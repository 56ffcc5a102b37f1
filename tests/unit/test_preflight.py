import os
from pathlib import Path

import pytest

from tunneld.preflight import (
    AlreadyRunningError,
    has_net_admin,
    interface_lock,
    running_daemon_pid,
)


def test_one_owner_per_interface(tmp_path: Path) -> None:
    with interface_lock("tdunit0", tmp_path):
        with (
            pytest.raises(
                AlreadyRunningError, match=r"tdunit0 is managed by another tunneld \(pid \d+\)"
            ),
            interface_lock("tdunit0", tmp_path),
        ):
            pass
        with interface_lock("tdunit1", tmp_path):  # another interface is independent
            pass
    with interface_lock("tdunit0", tmp_path):  # released on exit
        pass


def test_capability_is_read_from_the_effective_set(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    assert has_net_admin(status)
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    assert not has_net_admin(status)
    assert not has_net_admin(tmp_path / "absent")


def test_the_running_daemon_is_found_by_its_held_lock(tmp_path: Path) -> None:
    assert running_daemon_pid("tdunit0", tmp_path) is None  # no lock file at all
    with interface_lock("tdunit0", tmp_path):
        assert running_daemon_pid("tdunit0", tmp_path) == os.getpid()
    # The file stays behind, but nobody holds it: no daemon.
    assert (tmp_path / "tdunit0.lock").exists()
    assert running_daemon_pid("tdunit0", tmp_path) is None
