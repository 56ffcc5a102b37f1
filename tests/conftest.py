"""Shared test set-up: prerequisites of the root/namespace tests.

Outside CI a machine without root or WireGuard tools skips those tests with the reason. Under
``CI=true`` the same condition is a failure: a suite that silently skips its integration tests
would report green while proving nothing.
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def missing_prerequisite(message: str) -> NoReturn:
    """Skip the test for lack of ``message``'s tool or permission; under CI=true, fail it."""
    if IN_CI:
        pytest.fail(f"CI=true and missing prerequisite: {message}", pytrace=False)
    pytest.skip(message)


def missing_root_prerequisites() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces and WireGuard devices need it)")
    commands = ("ip", "wg", "wireguard-go", "setpriv", "nft")
    tools = [tool for tool in commands if shutil.which(tool) is None]
    if tools:
        missing.append(
            f"the commands {', '.join(tools)} (scripts/bootstrap installs them: iproute2 "
            "wireguard-tools wireguard-go util-linux nftables)"
        )
    if ctypes.util.find_library("nftables") is None:  # the daemon's filter (interface.firewall)
        missing.append("libnftables (scripts/bootstrap installs it: libnftables1)")
    if not Path("/dev/net/tun").exists():
        missing.append("/dev/net/tun")
    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Outside CI, skip root tests on a machine that cannot run them (saying why)."""
    missing = missing_root_prerequisites()
    if not missing or IN_CI:
        return
    reason = "missing prerequisites: " + "; ".join(missing)
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _root_prerequisites_in_ci(request: pytest.FixtureRequest) -> None:
    """Under CI=true a root test on a machine without its prerequisites fails, loudly."""
    if IN_CI and request.node.get_closest_marker("root") is not None:
        missing = missing_root_prerequisites()
        if missing:
            pytest.fail("CI=true and missing prerequisites: " + "; ".join(missing), pytrace=False)
