"""The VM suite's host side: the ``vm`` marker, its prerequisites, and what not to collect.

``tests/vm/test_vm.py`` boots the VM; ``tests/vm/guest/`` holds the tests that run inside it and
are collected only there (``VMTEST_GUEST=1``, set by ``in_guest.sh``). Outside CI a machine
without the VM's prerequisites skips the ``vm`` test with the reason; under ``CI=true`` that is a
failure, like the root tests (``tests/conftest.py``).
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import IN_CI
from tests.vm.machine import missing_prerequisites

IN_GUEST = os.environ.get("VMTEST_GUEST") == "1"
collect_ignore = [] if IN_GUEST else ["guest"]


def pytest_configure(config: pytest.Config) -> None:
    # Also belongs in pyproject.toml's markers; registered here so --strict-markers accepts it.
    config.addinivalue_line(
        "markers", "vm: boots a QEMU VM with a Debian kernel to test the kernel WireGuard backend"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Outside CI, skip the ``vm`` test with the reason when its prerequisites are missing.

    Under CI it runs and fails on them itself (a ``usefixtures`` mark added here would come too
    late: an item's fixtures are fixed when it is collected).
    """
    vm_items = [item for item in items if item.get_closest_marker("vm") is not None]
    missing = missing_prerequisites() if vm_items and not IN_CI else []
    if missing:
        skip = pytest.mark.skip(reason="VM prerequisites missing: " + "; ".join(missing))
        for item in vm_items:
            item.add_marker(skip)
