"""CPU time and memory of processes, read from /proc.

CPU is ``utime + stime`` of ``/proc/PID/stat`` (all threads of the process, not its children),
in seconds. Memory is ``VmRSS`` (resident now) and ``VmHWM`` (the resident high-water mark since
the process started) of ``/proc/PID/status``, in KiB. A process group (nginx's master and
workers) is summed; a process that has gone away counts as 0. The soak also reads the open fds
(``/proc/PID/fd``) and the thread count (``Threads:``).
"""

from __future__ import annotations

import os
import statistics
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    fields = stat.rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLOCK_TICKS_PER_SECOND


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all processes whose parent it is)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and parent_pid(int(entry.name)) == pid:
            found.append(int(entry.name))
    return sorted(found)


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of one process in KiB; (0, 0) if it is gone."""
    rss = hwm = 0
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def open_fds(pid: int) -> list[str]:
    """What each open fd of a process points to (``socket:[123]``, a path, ``anon_inode:…``);
    empty if the process is gone. An fd closed while the directory is read is skipped."""
    try:
        entries = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return []
    targets = []
    for entry in entries:
        try:
            targets.append(str(entry.readlink()))
        except OSError:
            continue
    return targets


def thread_count(pid: int) -> int:
    """Threads of a process (``Threads:`` of /proc/PID/status); 0 if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class ProcessGroup:
    """The processes that make up one program (nginx: a master and its workers).

    The pids are fixed when the group is made, so sampling it does not scan /proc. tunneld's
    child, wireguard-go, is measured as a group of its own, not as part of tunneld.
    """

    name: str
    pids: tuple[int, ...]

    @classmethod
    def of(cls, name: str, pid: int, *, tree: bool = False) -> ProcessGroup:
        return cls(name, (pid, *children(pid)) if tree else (pid,))

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def rss_kib(self) -> int:
        return sum(memory_kib(pid)[0] for pid in self.pids)

    def hwm_kib(self) -> int:
        """Sum of the processes' high-water marks (an upper bound of the group's peak)."""
        return sum(memory_kib(pid)[1] for pid in self.pids)


def cpu_snapshot(groups: Iterable[ProcessGroup]) -> dict[str, float]:
    return {group.name: group.cpu_seconds() for group in groups}


@dataclass
class RssSampler:
    """Samples the resident memory of some groups every ``interval_seconds`` in a thread."""

    groups: list[ProcessGroup]
    interval_seconds: float = 0.5
    samples: dict[str, list[int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self.samples = {group.name: [] for group in self.groups}
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            for group in self.groups:
                self.samples[group.name].append(group.rss_kib())

    def summary(self) -> dict[str, dict[str, int]]:
        return {
            name: {"median_kib": int(statistics.median(values)), "max_kib": max(values)}
            for name, values in self.samples.items()
            if values
        }
