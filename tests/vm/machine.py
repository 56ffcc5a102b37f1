"""Booting the kernel-backend test VM from the host: prerequisites, the vng command, the run.

The VM is virtme-ng (``vng``) running a Debian kernel under QEMU's TCG (KVM does not work on
these machines), with this machine's root filesystem shared read-only over 9p. Inside it,
``tests/vm/in_guest.sh`` runs pytest on ``tests/vm/guest`` and writes its results into a scratch
directory shared read-write (``--rwdir``). ``scripts/bootstrap-vm`` installs everything named here.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
IN_GUEST = REPO / "tests" / "vm" / "in_guest.sh"
#: The whole VM run — boot, tests, power-off — measured at 2 to 2.5 minutes; the suite must stay
#: under 5, and a run that would not is stopped rather than left to hang CI.
VM_TIMEOUT_SECONDS = 290.0
GUEST_MEMORY = "2G"
INSTALL_HINT = "run ./scripts/bootstrap-vm (installs qemu-system-x86, linux-image-amd64, "
INSTALL_HINT += "busybox-static and virtme-ng)"


def _module_dir(vmlinuz: Path) -> Path:
    return Path("/lib/modules") / vmlinuz.name.removeprefix("vmlinuz-")


def find_kernel() -> Path | None:
    """The kernel to boot: ``$VMTEST_KERNEL``, else the newest ``/boot/vmlinuz-*`` whose
    modules include WireGuard and 9p (virtme-ng's root filesystem share)."""
    override = os.environ.get("VMTEST_KERNEL")
    if override:
        return Path(override) if Path(override).is_file() else None
    candidates = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        modules = _module_dir(vmlinuz)
        wireguard = list(modules.glob("kernel/drivers/net/wireguard/wireguard.ko*"))
        ninep = list(modules.glob("kernel/fs/9p/9p.ko*"))
        if wireguard and ninep:
            candidates.append(vmlinuz)
    return max(candidates, key=lambda path: path.stat().st_mtime, default=None)


def missing_prerequisites() -> list[str]:
    missing = []
    if not (VENV_BIN / "vng").exists():
        missing.append(f"virtme-ng's `vng` in {VENV_BIN}")
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64")
    if not any(shutil.which(name) for name in ("busybox-static", "busybox")):
        missing.append("busybox (virtme-ng builds its initramfs from it)")
    if find_kernel() is None:
        missing.append("a /boot/vmlinuz-* whose modules include wireguard.ko and 9p.ko")
    if missing:
        missing[-1] += f": {INSTALL_HINT}"
    return missing


def vng_argv(kernel: Path, scratch: Path, pytest_args: list[str]) -> list[str]:
    guest_command = shlex.join(["bash", str(IN_GUEST), str(REPO), str(scratch), *pytest_args])
    return [
        str(VENV_BIN / "vng"),
        "--run", str(kernel),
        "--user", "root",
        "--disable-kvm",
        "--qemu-opts=-cpu max",
        "--cpus", "2",
        "--memory", GUEST_MEMORY,
        "--rwdir", str(scratch),
        "--cwd", str(REPO),
        "--exec", guest_command,
    ]  # fmt: skip


@dataclass(frozen=True)
class VmRun:
    returncode: int | None  # None: stopped at the timeout
    output: str
    wall_seconds: float


def run_vm(argv: list[str], echo: TextIO, timeout: float = VM_TIMEOUT_SECONDS) -> VmRun:
    """Run ``vng``, echoing its output as it comes; on timeout stop its whole process group
    (vng → virtme-run → qemu) and return what was printed until then."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.monotonic()
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=env,
        start_new_session=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            echo.write(line)
            echo.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    returncode: int | None = None
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if process.poll() is None:  # the timeout, or an interrupt: leave no qemu behind
            _kill_group(process.pid)
            process.wait(timeout=30)
        reader.join(timeout=30)
        if process.stdout is not None:
            process.stdout.close()
    return VmRun(returncode, "".join(lines), time.monotonic() - started)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
