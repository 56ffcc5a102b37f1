"""The benchmark's two namespaces and every process in them.

    gateway netns "tbgw-XXXXXX"                        host netns "tbhost-XXXXXX"
    wireguard-go -f + `wg set` (a stock peer) ─ veth ─ tunneld run (userspace: its wireguard-go)
    underlay 198.18.0.1/24, tunnel 10.44.0.1/24        underlay 198.18.0.2/24, tunnel 10.44.0.2/24
    load: wrk, iperf3 -c                               origin nginx on 127.0.0.1 (and on the
                                                       tunnel address for `direct`), nginx proxy,
                                                       HAProxy, iperf3 -s

198.18.0.0/15 is the benchmarking range and exists only inside these namespaces. Names carry a
random suffix (wireguard-go's UAPI sockets in /var/run/wireguard are shared by all namespaces).

Clean-up: :meth:`Topology.close` stops the processes it started, last started first (SIGTERM,
then SIGKILL after 15 s; the gateway's wireguard-go last, so tunneld's drain can still reach the
clients), kills whatever else still runs inside the namespaces, deletes them (the veth pair goes
with them) and removes the UAPI sockets. A state file in /run/tunneld-bench names what a run
created, so a run killed with SIGKILL is cleaned up by the next one (or ``bench/run --cleanup``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import netns, servers
from bench.procstat import ProcessGroup, children, command_name
from bench.tools import tool_path

STATE_DIR = Path("/run/tunneld-bench")
WORKDIR_PREFIX = "tunneld-bench-"  # of the work directories (tempfile), which stale runs leave
SYSCTLS = {
    # Connection-per-request workloads open tens of thousands of connections in a few seconds.
    "net/ipv4/ip_local_port_range": "10000 65000",
    "net/ipv4/tcp_tw_reuse": "1",
    "net/core/somaxconn": "8192",
}


class TopologyError(Exception):
    """Setting up the namespaces or a program in them failed."""


def run(*argv: str, check: bool = True, input_text: str | None = None, timeout: float = 30) -> str:
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, input=input_text, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise TopologyError(f"{' '.join(argv)} took more than {timeout:g}s") from exc
    if check and result.returncode != 0:
        raise TopologyError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TopologyError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


def process_start(pid: int) -> int | None:
    """The start time of a live process (clock ticks since boot); None if gone or a zombie.

    With the pid it names one process for good: a recycled pid has another start time.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    if fields[0] == "Z":  # killed, not yet reaped (its parent may never reap it)
        return None
    return int(fields[19])  # field 22 of proc(5)


class Topology:
    def __init__(
        self,
        workdir: Path,
        log: Callable[[str], None] = print,
        upstream_idle: int = servers.UPSTREAM_IDLE_CONNECTIONS,
        tunneld_src: Path | None = None,
    ) -> None:
        self.upstream_idle = upstream_idle
        self.tunneld_src = tunneld_src  # a directory holding another `tunneld` package to run
        self.suffix = secrets.token_hex(3)
        self.workdir = workdir
        self.log = log
        self.gateway_ns = f"tbgw-{self.suffix}"
        self.host_ns = f"tbhost-{self.suffix}"
        self.gateway_ifname = f"tbg{self.suffix}"
        self.host_ifname = f"tbh{self.suffix}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.state_file = STATE_DIR / f"{self.suffix}.json"
        self.tunneld_config = workdir / "tunneld.toml"
        self.host_public_key = ""
        self.gateway_public_key = ""

    # -- set-up -----------------------------------------------------------------------------

    def build(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "start": process_start(os.getpid()),
                    "namespaces": [self.gateway_ns, self.host_ns],
                    "ifnames": [self.gateway_ifname, self.host_ifname],
                    "workdir": str(self.workdir),
                }
            )
        )
        (self.workdir / "spool").mkdir(parents=True, exist_ok=True)
        for ns in (self.gateway_ns, self.host_ns):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            for key, value in SYSCTLS.items():
                run("ip", "netns", "exec", ns, "sh", "-c", f"echo '{value}' > /proc/sys/{key}")
        gateway_veth, host_veth = f"tbvg{self.suffix}", f"tbvh{self.suffix}"
        run(
            "ip", "link", "add", gateway_veth, "netns", self.gateway_ns,
            "type", "veth", "peer", "name", host_veth, "netns", self.host_ns,
        )  # fmt: skip
        for ns, link, address in (
            (self.gateway_ns, gateway_veth, servers.GATEWAY_UNDERLAY),
            (self.host_ns, host_veth, servers.HOST_UNDERLAY),
        ):
            run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", link)
            run("ip", "-n", ns, "link", "set", link, "up")

    def spawn(
        self, name: str, namespace: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-running program inside ``namespace``; its output goes to NAME.log.

        ``ip netns exec`` execs the program, so the child's pid is the program's. Its own
        session keeps a Ctrl-C on the terminal away from it: the harness stops it in order.
        It runs in the work directory (so ``python -m`` does not import from the caller's).
        """
        with (self.workdir / f"{name}.log").open("ab") as log_file:
            process = subprocess.Popen(
                ["ip", "netns", "exec", namespace, *argv],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.workdir,
                env={**os.environ, **(env or {})},
            )
        self.processes[name] = process
        return process

    def program_log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _check_alive(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is not None:
            tail = "\n".join(self.program_log(name).splitlines()[-20:])
            raise TopologyError(f"{name} exited with {process.returncode}:\n{tail}")

    def start_gateway(self) -> None:
        """A stock WireGuard peer: wireguard-go in the foreground, configured by ``wg set``."""
        wg = tool_path("wg")
        host_private = run(wg, "genkey")
        host_key = self.workdir / "host.key"
        host_key.write_text(host_private)
        host_key.chmod(0o600)
        self.host_public_key = run(wg, "pubkey", input_text=host_private).strip()
        gateway_private = run(wg, "genkey")
        gateway_key = self.workdir / "gateway.key"
        gateway_key.write_text(gateway_private)
        gateway_key.chmod(0o600)
        self.gateway_public_key = run(wg, "pubkey", input_text=gateway_private).strip()

        self.spawn(
            "gateway-wireguard-go",
            self.gateway_ns,
            [tool_path("wireguard-go"), "-f", self.gateway_ifname],
        )
        socket_path = Path(f"/var/run/wireguard/{self.gateway_ifname}.sock")

        def device_ready() -> bool:
            self._check_alive("gateway-wireguard-go")
            return socket_path.exists()

        wait_for("the gateway's wireguard-go", device_ready, timeout=10)
        ns = self.gateway_ns
        run(
            "ip", "netns", "exec", ns, wg, "set", self.gateway_ifname,
            "private-key", str(gateway_key), "listen-port", str(servers.GATEWAY_PORT),
            "peer", self.host_public_key, "allowed-ips", f"{servers.HOST_TUNNEL}/32",
        )  # fmt: skip
        run(
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            f"{servers.GATEWAY_TUNNEL}/24",
            "dev",
            self.gateway_ifname,
        )
        run("ip", "-n", ns, "link", "set", self.gateway_ifname, "up")

    def start_tunneld(self) -> None:
        self.tunneld_config.write_text(
            servers.tunneld_config(
                self.host_ifname,
                self.workdir / "host.key",
                self.gateway_public_key,
                self.upstream_idle,
            )
        )
        argv = [sys.executable, "-m", "tunneld", "--log-level", "info", "run"]
        env = {}
        if self.tunneld_src is not None:
            env["PYTHONPATH"] = str(self.tunneld_src)
        self.spawn("tunneld", self.host_ns, [*argv, "-c", str(self.tunneld_config)], env)

        def running() -> bool:
            self._check_alive("tunneld")
            return "tunneld is running" in self.program_log("tunneld")

        wait_for("tunneld to log 'tunneld is running'", running, timeout=30)

        def handshake() -> bool:
            self._check_alive("tunneld")
            output = run(
                "ip", "netns", "exec", self.gateway_ns, tool_path("wg"), "show",
                self.gateway_ifname, "latest-handshakes",
            )  # fmt: skip
            return any(line.split()[-1] != "0" for line in output.splitlines() if line.strip())

        wait_for("a WireGuard handshake between the gateway and tunneld", handshake, timeout=20)

    def start_servers(self) -> None:
        """The origin, the nginx and HAProxy references, and the iperf3 server on the origin."""
        servers.write_body_files(self.workdir / "www")
        nginx = tool_path("nginx")
        for name, config in (
            ("origin", servers.nginx_origin_config(self.workdir)),
            ("nginx-proxy", servers.nginx_proxy_config(self.workdir, self.upstream_idle)),
        ):
            path = self.workdir / f"{name}.conf"
            path.write_text(config)
            error_log = str(self.workdir / f"{name}-error.log")
            self.spawn(name, self.host_ns, [nginx, "-e", error_log, "-c", str(path)])
        haproxy_config = self.workdir / "haproxy.cfg"
        haproxy_config.write_text(servers.haproxy_config())
        self.spawn(
            "haproxy", self.host_ns, [tool_path("haproxy"), "-db", "-f", str(haproxy_config)]
        )
        iperf3 = [tool_path("iperf3"), "--server", "--rcv-timeout", "10000"]
        for name, address, port in (
            ("iperf3-origin", "127.0.0.1", servers.BULK_ORIGIN_PORT),
            ("iperf3-direct", servers.HOST_TUNNEL, servers.BULK_DIRECT_PORT),
        ):
            pidfile = str(self.workdir / f"{name}.pid")  # also names the run in its argv
            argv = [*iperf3, "--bind", address, "--port", str(port), "--pidfile", pidfile]
            self.spawn(name, self.host_ns, argv)

    def wait_host_listening(self, name: str, port: int) -> None:
        """Wait until ``name`` listens on ``port`` in the host namespace (no connection made)."""

        def listening() -> bool:
            self._check_alive(name)
            output = run("ip", "netns", "exec", self.host_ns, "ss", "-Hltn", f"sport = :{port}")
            return bool(output.strip())

        wait_for(f"{name} to listen on port {port}", listening, timeout=15)

    def check_body_files(self) -> None:
        """The origin serves the 10 KB and 1 MB bodies (GET from the gateway, via ``direct``)."""
        for name, size in servers.BODY_FILES.items():
            status, body = netns.http_get(
                self.gateway_ns, servers.HOST_TUNNEL, servers.DIRECT_PORT, f"/files/{name}"
            )
            if status != 200 or len(body) != size:
                raise TopologyError(
                    f"the origin answered /files/{name} with {status} and {len(body)} bytes "
                    f"(expected 200 and {size}); see origin-error.log among the kept logs"
                )

    def wait_http(self, name: str, port: int) -> None:
        """Wait until a GET from the gateway namespace to the tunnel address and ``port`` gets
        the origin's 200 and its 31-byte body (through whatever ``name`` is)."""
        last_error = ""

        def answers() -> bool:
            nonlocal last_error
            self.check_running()
            try:
                status, body = netns.http_get(self.gateway_ns, servers.HOST_TUNNEL, port, timeout=2)
            except OSError as exc:
                last_error = str(exc)
                return False
            last_error = f"status {status}, {len(body)}-byte body"
            return status == 200 and body == servers.SMALL_BODY.encode()

        try:
            wait_for(f"{name} to answer on {servers.HOST_TUNNEL}:{port}", answers, timeout=15)
        except TopologyError as exc:
            raise TopologyError(f"{exc} (last: {last_error})") from None

    # -- what the measurements read -----------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What this run created, for the record (and for checks that it was all removed)."""
        return {
            "id": self.suffix,
            "namespaces": [self.gateway_ns, self.host_ns],
            "interfaces": [self.gateway_ifname, self.host_ifname],
            "workdir": str(self.workdir),
        }

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def tunneld_wireguard_go_pid(self) -> int:
        found = [
            pid for pid in children(self.pid("tunneld")) if command_name(pid) == "wireguard-go"
        ]
        if not found:
            raise TopologyError("tunneld has no wireguard-go child (is the userspace backend on?)")
        return found[0]

    def groups(self) -> dict[str, ProcessGroup]:
        """Every measured program, by name."""
        return {
            "tunneld": ProcessGroup.of("tunneld", self.pid("tunneld")),
            "wireguard-go-host": ProcessGroup.of(
                "wireguard-go-host", self.tunneld_wireguard_go_pid()
            ),
            "wireguard-go-gateway": ProcessGroup.of(
                "wireguard-go-gateway", self.pid("gateway-wireguard-go")
            ),
            "origin": ProcessGroup.of("origin", self.pid("origin"), tree=True),
            "nginx-proxy": ProcessGroup.of("nginx-proxy", self.pid("nginx-proxy"), tree=True),
            "haproxy": ProcessGroup.of("haproxy", self.pid("haproxy")),
        }

    def tunneld_metrics(self) -> str:
        """tunneld's /metrics, read from its listener on 127.0.0.1:9477 in the host namespace."""
        status, body = netns.http_get(self.host_ns, "127.0.0.1", 9477, "/metrics", "localhost")
        if status != 200:
            raise TopologyError(f"tunneld's /metrics answered {status}")
        return body.decode(errors="replace")

    def origin_counters(self) -> dict[str, int]:
        """The origin's connections accepted and requests served so far (nginx stub_status)."""
        status, body = netns.http_get(
            self.host_ns, "127.0.0.1", servers.ORIGIN_PORT, servers.ORIGIN_STATUS_PATH
        )
        # Active connections: 3 \nserver accepts handled requests\n 10 10 25 \nReading: ...
        numbers = body.decode().splitlines()[2].split() if status == 200 else []
        if len(numbers) != 3:
            raise TopologyError(f"unexpected origin status ({status}): {body[:200]!r}")
        return {"connections": int(numbers[0]), "requests": int(numbers[2])}

    def check_running(self) -> None:
        """Raise if any long-running program has exited."""
        for name in self.processes:
            self._check_alive(name)

    # -- tear-down ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the programs one by one, last started first: the gateway's WireGuard goes last,
        so tunneld's drain still reaches the clients (or sees their resets) through it."""
        for name, process in reversed(self.processes.items()):
            started = time.monotonic()
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.log(f"{name} did not stop within 15s of SIGTERM; killing it")
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
            else:
                elapsed = time.monotonic() - started
                if elapsed > 2:
                    self.log(f"{name} took {elapsed:.1f}s to stop")
        teardown([self.gateway_ns, self.host_ns], [self.gateway_ifname, self.host_ifname])
        self.state_file.unlink(missing_ok=True)


def teardown(namespaces: list[str], ifnames: list[str]) -> None:
    """Kill whatever runs in the namespaces, delete them, remove the UAPI sockets."""
    existing = set(run("ip", "netns", "list", check=False).split())
    for ns in namespaces:
        if ns not in existing:
            continue
        for _ in range(3):
            pids = run("ip", "netns", "pids", ns, check=False).split()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.2)
        run("ip", "netns", "del", ns, check=False)
    for ifname in ifnames:
        Path(f"/var/run/wireguard/{ifname}.sock").unlink(missing_ok=True)


def cleanup_stale(log: Callable[[str], None] = print) -> int:
    """Tear down what earlier runs left (their harness is gone); return how many runs."""
    if not STATE_DIR.is_dir():
        return 0
    cleaned = 0
    for state_file in sorted(STATE_DIR.glob("*.json")):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        start = process_start(int(state.get("pid", 0)))
        if start is not None and start == state.get("start"):
            continue  # a run in progress
        log(f"cleaning up after an earlier run: {', '.join(state['namespaces'])}")
        teardown(list(state["namespaces"]), list(state["ifnames"]))
        workdir = Path(state.get("workdir", ""))
        if workdir.name.startswith(WORKDIR_PREFIX) and workdir.is_dir():
            shutil.rmtree(workdir, ignore_errors=True)
        state_file.unlink(missing_ok=True)
        cleaned += 1
    return cleaned
