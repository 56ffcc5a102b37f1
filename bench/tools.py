"""The programs the harness runs, installed on demand, and a description of the machine.

Missing tools are installed from Debian packages with ``apt-get install --no-install-recommends``
(after an ``apt-get update`` if the first attempt fails). A tool that still cannot be had is a
:class:`ToolError` that names it and its package.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

# command -> Debian package
TOOLS = {
    "wrk": "wrk",
    "iperf3": "iperf3",
    "nginx": "nginx-light",
    "haproxy": "haproxy",
    "wireguard-go": "wireguard-go",
    "wg": "wireguard-tools",
    "ip": "iproute2",
}
APT_TIMEOUT_SECONDS = 600


class ToolError(Exception):
    """A tool the benchmark needs is missing and could not be installed."""


def missing_tools() -> dict[str, str]:
    return {tool: package for tool, package in TOOLS.items() if _which(tool) is None}


def _which(tool: str) -> str | None:
    # nginx and haproxy live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def tool_path(tool: str) -> str:
    path = _which(tool)
    if path is None:
        raise ToolError(f"{tool} is not installed (Debian package {TOOLS[tool]})")
    return path


def ensure_tools(log: Callable[[str], None] = print) -> None:
    """Install the Debian packages of missing tools (idempotent); raise ToolError if impossible."""
    missing = missing_tools()
    if not missing:
        return
    packages = sorted(set(missing.values()))
    if os.geteuid() != 0:
        raise ToolError(
            f"missing {', '.join(sorted(missing))}: run as root so the harness can install "
            f"{' '.join(packages)} (apt-get install --no-install-recommends)"
        )
    if shutil.which("apt-get") is None:
        raise ToolError(
            f"missing {', '.join(sorted(missing))} and no apt-get to install them: "
            f"install the packages {' '.join(packages)} by hand"
        )
    log(f"installing {' '.join(packages)} (apt-get --no-install-recommends)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    result = _apt(install, env)
    if result.returncode != 0:
        _apt(["apt-get", "update", "-q"], env)
        result = _apt(install, env)
    still_missing = missing_tools()
    if still_missing:
        tail = "\n".join(result.stdout.splitlines()[-15:])
        raise ToolError(
            f"could not install {', '.join(sorted(still_missing))} "
            f"(Debian packages {' '.join(sorted(set(still_missing.values())))}); "
            f"apt-get said:\n{tail}"
        )


def _apt(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=APT_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"{' '.join(argv)} took more than {APT_TIMEOUT_SECONDS}s") from exc


def _version_output(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (result.stdout + result.stderr).strip()


def _first_match(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    return match.group(1) if match else text.splitlines()[0] if text else "?"


def _debian_version(package: str) -> str:
    output = _version_output(["dpkg-query", "-W", "-f=${Version}", package])
    return output if output and "no packages found" not in output else "?"


def machine_description() -> dict[str, object]:
    """CPU, cores, memory, kernel, OS, Python and the versions of everything measured."""
    cpu_model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    os_name = "?"
    os_release = Path("/etc/os-release")
    if os_release.exists():
        for line in os_release.read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    python_packages = {}
    for name in ("tunneld", "trio", "httptools", "prometheus-client"):
        try:
            python_packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            python_packages[name] = "?"
    tools = {
        "nginx": _first_match(r"nginx/(\S+)", _version_output([tool_path("nginx"), "-v"])),
        "haproxy": _first_match(r"version (\S+)", _version_output([tool_path("haproxy"), "-v"])),
        "wrk": _debian_version("wrk"),
        "iperf3": _first_match(r"iperf (\S+)", _version_output([tool_path("iperf3"), "-v"])),
        "wireguard-go": _first_match(
            r"wireguard-go (\S+)", _version_output([tool_path("wireguard-go"), "--version"])
        ),
        "wireguard-tools": _first_match(
            r"wireguard-tools (\S+)", _version_output([tool_path("wg"), "--version"])
        ),
    }
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "memory_mib": memory_kib // 1024,
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "python_packages": python_packages,
        "tools": tools,
    }
