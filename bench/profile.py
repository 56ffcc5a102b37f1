"""bench/run --profile: where tunneld's CPU time goes under load, sampled with py-spy.

For each profiled target wrk runs the ``small`` workload while ``py-spy record`` samples the
tunneld process twice: once in py-spy's raw (collapsed-stack) format, which this module sums into
self and total time per function, by package and by tunneld module; once as a flame graph (SVG).
py-spy keeps only on-CPU samples (idle ones are dropped), so the shares are of tunneld's CPU
time, not of wall time. It pauses the process for each sample (``--nonblocking`` would not, but
then stacks come out torn), which slows tunneld a little: the req/s under py-spy is printed.
Only the main thread (the trio loop) is summed: trio's worker threads (pyroute2 calls) show up
as "running" while they wait for work, and are reported as one share apart.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import parse_wrk, wrk_argv
from bench.plan import TARGETS_BY_NAME, Workload

RATE_HZ = 100
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy(log: Any) -> str:
    """The py-spy next to this interpreter, installed into its environment with pip if missing."""
    candidate = Path(sys.executable).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("py-spy")
    if found:
        return found
    log("installing py-spy into the virtualenv (pip)")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "py-spy"],
        check=True,
        timeout=300,
    )
    return str(candidate)


def short_file(path: str) -> str:
    """``…/site-packages/trio/_core/_run.py`` → ``trio/_core/_run.py``; the same for tunneld."""
    for marker in ("site-packages/", "/work/main/", "/lib/python3."):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3." else tail
    index = path.find("tunneld/")
    return path[index:] if index >= 0 else path


def package_of(file: str) -> str:
    first = file.split("/", 1)[0]
    if first == "tunneld":
        return "tunneld"
    if first in ("trio", "outcome", "sniffio", "sortedcontainers"):
        return "trio"
    if first in ("httptools", "prometheus_client"):
        return first
    if "/" not in file or first in ("asyncio", "concurrent", "logging", "json", "email"):
        return "python stdlib"
    return first


@dataclass
class Profile:
    samples: int = 0  # of the main thread
    other_thread_samples: int = 0
    seconds: float = 0.0
    self_time: Counter[str] = field(default_factory=Counter)
    total_time: Counter[str] = field(default_factory=Counter)
    package_self: Counter[str] = field(default_factory=Counter)
    module_self: Counter[str] = field(default_factory=Counter)
    module_total: Counter[str] = field(default_factory=Counter)


def frame_key(frame: str) -> tuple[str, str]:
    """(``function (file)``, file) of one py-spy frame, without its line number."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), ""
    file = short_file(match["file"])
    return f"{match['function']} ({file})", file


def summarize_raw(text: str) -> Profile:
    """Sum py-spy's raw output: each line is ``frame;frame;…;leaf COUNT``, root first."""
    profile = Profile()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_key(frame) for frame in stack.split(";")]
        frames = [(key, file) for key, file in frames if file]  # drop process/thread labels
        if not frames:
            continue
        if frames[0][0].startswith("Thread._bootstrap"):
            profile.other_thread_samples += count
            continue
        profile.samples += count
        leaf_key, leaf_file = frames[-1]
        profile.self_time[leaf_key] += count
        profile.package_self[package_of(leaf_file)] += count
        # Self time of tunneld's modules: the innermost tunneld frame pays for what it calls in
        # other packages (an httptools parse, a trio send), so this says which module's work it is.
        tunneld_frames = [file for _, file in frames if file.startswith("tunneld/")]
        if tunneld_frames:
            profile.module_self[tunneld_frames[-1]] += count
        for file in set(tunneld_frames):
            profile.module_total[file] += count
        for key in {key for key, _ in frames}:
            profile.total_time[key] += count
    return profile


def _share(count: int, total: int) -> str:
    return f"{count / total * 100:.1f}%" if total else "—"


def render(profiles: dict[str, tuple[Profile, dict[str, Any]]], top: int = 25) -> str:
    lines = [
        "# Where tunneld's CPU time goes",
        "",
        "Made by `bench/run --profile`: wrk drives a workload (`small`: 31-byte body, keep-alive, "
        "50 connections, unless said otherwise) through each target while `py-spy record` "
        "samples the tunneld process "
        f"at {RATE_HZ} Hz. Only on-CPU samples of the main thread (the trio loop) count, so the "
        "shares are of the CPU time of tunneld's event loop. *self*: the function itself was "
        "running (C calls it makes, such as socket sends or the httptools parser, count as its "
        "self time); *total*: it was on the stack.",
        "",
    ]
    for name, (profile, load) in profiles.items():
        total = profile.samples
        lines += [
            f"## {name}",
            "",
            f"{total} samples of the main thread in {profile.seconds:g} s: it was on CPU "
            f"{_share(total, int(profile.seconds * RATE_HZ))} of the time; other threads: "
            f"{profile.other_thread_samples} samples, left out. Under py-spy the load ran at "
            f"{load.get('requests_per_second', 0):,.0f} req/s (`{load.get('command', '')}`).",
            "",
            "### By package (self time)",
            "",
            "| package | self |",
            "|---|---:|",
            *(
                f"| {package} | {_share(count, total)} |"
                for package, count in profile.package_self.most_common()
            ),
            "",
            "### By tunneld module",
            "",
            "self: time in the module's own code and in the library calls it makes directly; "
            "total: the module is on the stack. tunneld/cli.py's self time is trio's run loop "
            "itself (scheduling, epoll, starting and ending tasks): cli.py calls `trio.run`, so "
            "it is the innermost tunneld frame of those stacks.",
            "",
            "| module | self | total |",
            "|---|---:|---:|",
            *(
                f"| {module} | {_share(count, total)} "
                f"| {_share(profile.module_total[module], total)} |"
                for module, count in profile.module_self.most_common()
            ),
            "",
            f"### Top {top} functions by self time",
            "",
            "| function | self | total |",
            "|---|---:|---:|",
            *(
                f"| `{key}` | {_share(count, total)} | {_share(profile.total_time[key], total)} |"
                for key, count in profile.self_time.most_common(top)
            ),
            "",
            f"### Top {top} functions by total time",
            "",
            "| function | total | self |",
            "|---|---:|---:|",
            *(
                f"| `{key}` | {_share(count, total)} | {_share(profile.self_time[key], total)} |"
                for key, count in profile.total_time.most_common(top)
            ),
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def profile_target(
    namespace: str,
    pid: int,
    target_name: str,
    base: Workload,
    seconds: int,
    output: Path,
    log: Any,
    scratch: Path,
) -> tuple[Profile, dict[str, Any]]:
    """Profile tunneld (``pid``) while wrk runs ``base`` against ``target_name``; write the flame
    graph to ``output`` (``profile-http.svg``; for a workload other than ``small``,
    ``profile-http-WORKLOAD.svg``) and the raw stacks, which are summed here, to ``scratch``."""
    spy = py_spy(log)
    target = TARGETS_BY_NAME[target_name]
    stem = "profile-" + target_name.removeprefix("tunneld-")
    if base.name != "small":
        stem += f"-{base.name}"
    workload = dataclasses.replace(base, duration_seconds=seconds + 4)
    load: dict[str, Any] = {}
    for kind, path in (("raw", scratch / f"{stem}.txt"), ("flamegraph", output / f"{stem}.svg")):
        argv = ["ip", "netns", "exec", namespace, *wrk_argv(workload, target)]
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as wrk:
            try:
                time.sleep(2)  # past the ramp-up
                spy_argv = [
                    spy, "record", "--pid", str(pid), "--duration", str(seconds),
                    "--rate", str(RATE_HZ), "--format", kind,
                    "--output", str(path),
                ]  # fmt: skip
                subprocess.run(spy_argv, capture_output=True, check=True, timeout=seconds + 30)
                out, _ = wrk.communicate(timeout=seconds + 30)
            finally:
                if wrk.poll() is None:
                    wrk.kill()
        if kind == "raw":
            result = parse_wrk(out)
            load = {
                "requests_per_second": result.requests_per_second,
                "command": " ".join(argv[4:]),
            }
        log(f"profile of {target_name} ({base.name}): wrote {path}")
    summary = summarize_raw((scratch / f"{stem}.txt").read_text())
    summary.seconds = seconds
    return summary, load
