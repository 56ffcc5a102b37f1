"""Fixtures for the tests that run inside the VM (see ``tests/vm/in_guest.sh``).

Nothing here skips: the VM was booted to run these tests, so a missing prerequisite is a failure
wherever it happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.guest.vmtopology import VmTopology


@pytest.fixture(scope="session", autouse=True)
def _guest_prerequisites() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("not root inside the VM (vng --user root)")
    problems += [
        f"no `{tool}` command"
        for tool in ("ip", "wg", "wireguard-go", "ping", "nft")
        if shutil.which(tool) is None
    ]
    if not Path("/dev/net/tun").exists():
        problems.append("/dev/net/tun is missing (modprobe tun)")
    probe = subprocess.run(
        ["ip", "link", "add", "tdvmprobe", "type", "wireguard"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        problems.append(f"this kernel cannot create a WireGuard link: {probe.stderr.strip()}")
    else:
        subprocess.run(["ip", "link", "del", "tdvmprobe"], timeout=30, check=False)
    if problems:
        pytest.fail("the VM lacks what the kernel-backend tests need: " + "; ".join(problems))


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[VmTopology]:
    """Gateway and host namespaces joined by veth, keys made; the test starts a gateway."""
    topo = VmTopology(tmp_path)
    try:
        topo.build()
        yield topo
    finally:
        topo.close()
