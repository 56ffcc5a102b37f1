"""The userspace backend's checks before and after its child runs (no root needed).

A refusal of the tun device is the case that matters and needs a non-root user: it is proved
for real in tests/integration/test_container_contract.py."""

from pathlib import Path

import pytest

from tunneld.errors import BackendError, BackendUnavailableError, PermissionError_
from tunneld.wireguard.userspace import _explain_exit, check_tun_device


def test_a_missing_tun_device_is_for_a_person_to_fix(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match=r"does not exist.*modprobe tun") as caught:
        check_tun_device(tmp_path / "tun")
    assert caught.value.exit_code == 2


def test_a_device_that_opens_passes() -> None:
    check_tun_device(Path("/dev/null"))  # opened read-write and closed, nothing else


@pytest.mark.parametrize(
    "line",
    [
        "ERROR: (tunneld0) 2026/12/05 09:05:30 Failed to create TUN device: permission denied",
        "ERROR: (tunneld0) 2026/12/05 09:05:30 Failed to create TUN device: operation not "
        "permitted",
    ],
)
def test_a_child_refused_by_the_kernel_ends_the_rebuilding(line: str) -> None:
    error = _explain_exit("wireguard-go", 1, [line])
    assert isinstance(error, PermissionError_) and error.exit_code == 2
    assert "read-write access to /dev/net/tun" in str(error)
    assert line in str(error)


def test_any_other_exit_is_rebuilt() -> None:
    error = _explain_exit("wireguard-go", 1, ["ERROR: something transient"])
    assert type(error) is BackendError and error.exit_code == 1
