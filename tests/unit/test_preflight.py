from pathlib import Path

import pytest

from tunneld.preflight import AlreadyRunningError, has_net_admin, interface_lock


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
