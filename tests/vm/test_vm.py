"""The kernel WireGuard backend, tested for real: boot a Debian kernel in a VM, run tests/vm/guest.

This machine's kernel has no WireGuard, so one test boots a VM (see :mod:`tests.vm.machine`) and
runs the guest tests inside it with this checkout and its virtualenv. The guest pytest's exit
status, its JUnit report and its whole output come back here: any guest failure, error or skip —
or a VM that does not boot, or a run past the time budget — fails this test with the guest's
output in the message.

``VMTEST_PYTEST_ARGS`` passes extra arguments to the guest pytest (e.g. ``-k restart``); the
check that every expected guest test ran is then relaxed.
"""

from __future__ import annotations

import os
import shlex
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NoReturn

import pytest

from tests.vm.machine import (
    VM_TIMEOUT_SECONDS,
    find_kernel,
    missing_prerequisites,
    run_vm,
    vng_argv,
)

pytestmark = pytest.mark.vm

#: What the issue asks the VM to show; the guest may run more, never less.
EXPECTED_GUEST_TESTS = {
    "test_kernel_backend::test_bring_up_sets_key_port_fwmark_peer_addresses_and_routes",
    "test_kernel_backend::test_reconfigure_converges_peers_allowed_ips_and_preshared_key",
    "test_kernel_netlink::test_seam_answers_and_errors_from_a_real_kernel",
    "test_kernel_daemon::test_kernel_tunneld_with_userspace_gateway",
    "test_kernel_daemon::test_userspace_tunneld_with_kernel_gateway",
    "test_kernel_daemon::test_auto_picks_kernel_and_sigterm_removes_everything",
    "test_kernel_daemon::test_restart_after_kill_9_adopts_the_kernel_link",
}


def guest_results(junit: Path) -> dict[str, str]:
    """``module::test`` → passed / failed / error / skipped, from the guest's JUnit report."""
    results = {}
    # Our own guest's report, written moments ago: not untrusted input.
    for case in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314
        module = case.get("classname", "").rpartition(".")[2]
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
        results[f"{module}::{case.get('name')}"] = outcome
    return results


def test_kernel_backend_inside_a_debian_kernel_vm(tmp_path: Path) -> None:
    missing = missing_prerequisites()  # outside CI, conftest.py has skipped us already
    if missing:
        pytest.fail("CI=true and VM prerequisites missing: " + "; ".join(missing), pytrace=False)
    kernel = find_kernel()
    assert kernel is not None
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    guest_args = shlex.split(os.environ.get("VMTEST_PYTEST_ARGS", ""))

    vm = run_vm(vng_argv(kernel, scratch, guest_args), echo=sys.stdout)
    (tmp_path / "vm-output.txt").write_text(vm.output)
    release_file = scratch / "kernel-release"
    release = release_file.read_text().strip() if release_file.exists() else "(unknown)"
    print(f"\nVM run: kernel {release} ({kernel}), {vm.wall_seconds:.0f} s wall")

    def fail(why: str) -> NoReturn:
        pytest.fail(f"{why}\n--- VM output ({kernel}) ---\n{vm.output}", pytrace=False)

    if vm.returncode is None:
        fail(f"the VM run did not finish within {VM_TIMEOUT_SECONDS:g} s and was stopped")
    status_file = scratch / "exit-status"
    if not status_file.exists():
        fail(f"the VM never ran the guest tests (boot failure?); vng exited {vm.returncode}")
    guest_status = int(status_file.read_text())
    junit = scratch / "junit.xml"
    results = guest_results(junit) if junit.exists() else {}
    for name, outcome in sorted(results.items()):
        print(f"  [{outcome}] {name}")
    if guest_status != 0 or vm.returncode != 0:
        fail(f"guest pytest exited {guest_status}, vng exited {vm.returncode}")
    not_passed = {name: outcome for name, outcome in results.items() if outcome != "passed"}
    if not_passed:
        fail(f"guest tests not passed (a skip counts: the VM exists to run them): {not_passed}")
    did_not_run = EXPECTED_GUEST_TESTS - set(results)
    if did_not_run and not guest_args:
        fail(f"guest tests that did not run: {sorted(did_not_run)}")
    if not results:
        fail("the guest ran no test")
