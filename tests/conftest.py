"""Shared test set-up: prerequisites of the root/namespace tests.

Outside CI a machine without root or WireGuard tools skips those tests with the reason. Under
``CI=true`` the same condition is a failure: a suite that silently skips its integration tests
would report green while proving nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def missing_root_prerequisites() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces and WireGuard devices need it)")
    for tool in ("ip", "wg", "wireguard-go", "setpriv"):
        if shutil.which(tool) is None:
            missing.append(
                f"the `{tool}` command (apt-get install --no-install-recommends "
                "iproute2 wireguard-tools wireguard-go util-linux)"
            )
    if not Path("/dev/net/tun").exists():
        missing.append("/dev/net/tun")
    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = missing_root_prerequisites()
    if not missing:
        return
    reason = "missing prerequisites: " + "; ".join(missing)
    for item in items:
        if item.get_closest_marker("root") is None:
            continue
        if IN_CI:
            item.add_marker(pytest.mark.usefixtures("_fail_missing_prerequisites"))
        else:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def _fail_missing_prerequisites() -> None:
    pytest.fail("CI=true and " + "; ".join(missing_root_prerequisites()), pytrace=False)
