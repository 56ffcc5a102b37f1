"""Command line: ``main(argv) -> exit code``.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error (bad config, bad key file,
missing privilege or WireGuard implementation — things a person must fix before a retry helps).
``route-test`` answers a question, like grep: 0 routed, 1 not routed (404), 2 bad config or URL.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import signal
import sys
import time
import urllib.parse
from functools import partial
from pathlib import Path
from typing import Any

import trio

from tunneld import __version__, daemon, keys, logs
from tunneld.config import Config, HostPort, load_config, render_config
from tunneld.config_proxy import ServiceConfig
from tunneld.config_reader import quote, shown
from tunneld.errors import KeyFileError, principal_error
from tunneld.preflight import interface_lock, require_net_admin, running_daemon_pid
from tunneld.proxy.paths import PathError, normalize_target
from tunneld.proxy.routes import Router
from tunneld.status import device_report, format_status
from tunneld.tunnel import Tunnel, load_tunnel_keys
from tunneld.wireguard.device import delete_device, existing_device, open_device
from tunneld.wireguard.firewall import remove_filter
from tunneld.wireguard.model import DeviceStats

log = logging.getLogger("tunneld")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: An error with more problems than this (a file of 80,000 empty tables has 240,000) prints
#: this many and a count.
MAX_PRINTED_PROBLEMS = 1000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunneld", description="WireGuard secure-tunnel connector for private services."
    )
    parser.add_argument("--version", action="version", version=f"tunneld {__version__}")
    parser.add_argument(
        "--log-level", choices=logs.LEVELS, help="default: $TUNNELD_LOG_LEVEL or info"
    )
    parser.add_argument(
        "--log-format", choices=logs.LOG_FORMATS, help="default: $TUNNELD_LOG_FORMAT or text"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "-c",
            "--config",
            type=Path,
            help="config file (default: $TUNNELD_CONFIG, else /etc/tunneld/tunneld.toml if it "
            "exists, else TUNNELD_* variables alone)",
        )
        return sub

    with_config("run", "run in the foreground: bring the tunnel up, keep it, tear down on SIGTERM")
    with_config("up", "bring the interface up and exit, leaving it configured (for debugging)")
    down = with_config("down", "remove the interface and everything on it")
    down.add_argument("-i", "--interface", help="interface name (default: from the config)")
    status = with_config(
        "status",
        "show the interface, public key and each gateway peer (from the running daemon's "
        "/status, else from the interface itself)",
    )
    status.add_argument("-i", "--interface", help="interface name (default: from the config)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    with_config("check-config", "validate the config and print it as tunneld sees it")
    with_config(
        "ready",
        "ask the running daemon's /readyz: exit 0 if ready, 1 if not (for health checks)",
    )
    with_config(
        "reload",
        "validate the config, then tell the running daemon to apply it (SIGHUP); exit 2 and "
        "leave the daemon alone if it is invalid",
    )
    route_test = with_config(
        "route-test", "show which service a request URL is routed to (exit 1 if none)"
    )
    route_test.add_argument(
        "url", help="the URL as the gateway would request it, e.g. http://billing/v1/x"
    )
    commands.add_parser("genkey", help="print a new private key (like `wg genkey`)")
    commands.add_parser("pubkey", help="read a private key on stdin, print its public key")
    install = commands.add_parser(
        "install-systemd",
        help="install the systemd unit, a key and a starter config; print the gateway's peer lines",
        description="Install /etc/systemd/system/tunneld.service, create the key (never "
        "overwritten) and a starter config (only if missing), run systemctl daemon-reload, and "
        "print this connector's public key with the [Peer] the gateway needs.",
    )
    install.add_argument(
        "--root", type=Path, metavar="DIR", help="write everything below DIR; no systemctl"
    )
    install.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help="the config to write (default: /etc/tunneld/tunneld.toml); an existing one is kept",
    )
    install.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="CIDR",
        help="this connector's tunnel address, e.g. 10.44.0.2/24 (repeatable)",
    )
    install.add_argument(
        "--gateway-endpoint",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="where the gateway's WireGuard listens (repeatable: failover order)",
    )
    install.add_argument(
        "--gateway-public-key", metavar="KEY", help="the gateway's public key (base64)"
    )
    install.add_argument(
        "--gateway-address",
        action="append",
        default=[],
        metavar="IP",
        help="the gateway's tunnel address (default: the first address of each --address network)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version exit 0, usage errors exit 2
        return int(exc.code or 0)
    logs.configure(args.log_level, args.log_format)
    handler = _COMMANDS[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception as exc:
        error = principal_error(exc)
        if error is None:
            raise  # a bug: let the traceback show
        lines = str(error).splitlines()  # a ConfigError lists every problem, one per line
        for line in lines[:MAX_PRINTED_PROBLEMS]:
            log.error("%s", line)
        if len(lines) > MAX_PRINTED_PROBLEMS:  # the rest would only flood the journal
            log.error(
                "… and %d more problems (%d in all); fix these first, then check again",
                len(lines) - MAX_PRINTED_PROBLEMS,
                len(lines),
            )
        return error.exit_code


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    trio.run(daemon.run, config, partial(load_config, args.config))
    return EXIT_OK


def _cmd_up(args: argparse.Namespace) -> int:
    config = _load(args)
    require_net_admin()
    tunnel = Tunnel(config, load_tunnel_keys(config, create_missing=True))

    async def up() -> None:
        interface = config.interface
        async with open_device(
            interface.name, interface.backend, interface.userspace_binary, detach=True
        ) as device:
            await tunnel.bring_up(device)

    with interface_lock(config.interface.name):
        trio.run(up)
    return EXIT_OK


def _interface_name(args: argparse.Namespace) -> tuple[str, Config | None]:
    if args.interface:
        return args.interface, None
    config = _load(args)
    return config.interface.name, config


def _cmd_down(args: argparse.Namespace) -> int:
    ifname, _ = _interface_name(args)
    require_net_admin()

    async def down() -> bool:
        removed = await delete_device(ifname)
        # After the link: the filter is the last thing of ours to go.
        return await remove_filter(ifname) or removed

    with interface_lock(ifname):
        removed = trio.run(down)
    print(f"{ifname}: removed" if removed else f"{ifname}: not present")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    ifname, config = _interface_name(args)
    listen = config.metrics.listen if config is not None else None
    report = None
    if listen is not None:
        report = _daemon_status(listen, ifname)
    if report is None:  # no daemon (or no endpoint): what the interface itself says
        report = _device_status(ifname, config)
        if report is None:
            print(f"{ifname}: no such interface", file=sys.stderr)
            return EXIT_FAILURE
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_OK


def _daemon_status(listen: HostPort, ifname: str) -> dict[str, Any] | None:
    """The running daemon's ``/status``, or None if no daemon for ``ifname`` answers."""
    try:
        status, body = fetch(listen, "/status")
        report = json.loads(body)
    except (OSError, ValueError):
        return None
    if status != 200 or not isinstance(report, dict) or report.get("interface") != ifname:
        return None  # another daemon's endpoint, or not ours at all
    return report


def _device_status(ifname: str, config: Config | None) -> dict[str, Any] | None:
    async def read() -> tuple[str, DeviceStats] | None:
        device = await existing_device(ifname)
        return None if device is None else (device.backend_name, await device.stats())

    found = trio.run(read)
    if found is None:
        return None
    backend, stats = found
    names = {gateway.public_key: gateway.name for gateway in config.gateways} if config else {}
    return device_report(ifname, backend, stats, names, now=time.time())


def _cmd_ready(args: argparse.Namespace) -> int:
    config = _load(args)
    listen = config.metrics.listen
    if listen is None:
        print('tunneld ready: [metrics] listen = "off": there is no /readyz to ask',
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    try:
        status, body = fetch(listen, "/readyz")
    except OSError as exc:
        print(f"not ready: no tunneld answers on {listen} ({exc.strerror or exc})")
        return EXIT_FAILURE
    if status == 200:
        print("ready")
        return EXIT_OK
    try:
        reasons = json.loads(body).get("reasons", [])
    except (ValueError, AttributeError):
        reasons = [f"HTTP {status}"]
    print("not ready: " + "; ".join(str(reason) for reason in reasons))
    return EXIT_FAILURE


def fetch(listen: HostPort, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """GET ``path`` from the daemon's endpoint at ``listen`` (a wildcard means this host)."""
    wildcard_to_loopback = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 -- not a bind
    host = wildcard_to_loopback.get(listen.host, listen.host)
    connection = http.client.HTTPConnection(host, listen.port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    for note in check_secret_files(config, creating=True):
        log.info("%s", note)
    print(render_config(config), end="")
    return EXIT_OK


def check_secret_files(config: Config, *, creating: bool) -> list[str]:
    """Check every key and secret file of ``config`` as ``run`` (``creating``) or a reload
    would read it, and create nothing; return notes (a key ``run`` will create).

    Raises one ``KeyFileError`` listing every file that would be refused, each with the message
    its refusal would have. The files are read with the same functions as there (a FIFO is not
    waited on, a file is checked before it is read), so no content is ever printed.
    """
    notes: list[str] = []
    problems: list[str] = []
    source = config.interface.private_key
    try:
        if creating and source.credential is None:
            if keys.check_private_key_file(source.path):
                notes.append(f"{source.path} does not exist; tunneld run will create it (mode 600)")
        else:
            keys.load_key_file(source.path)
    except KeyFileError as exc:
        problems.append(str(exc))
    for gateway in config.gateways:
        if gateway.preshared_key is not None:
            try:
                keys.load_key_file(gateway.preshared_key.path, what="preshared key")
            except KeyFileError as exc:
                problems.append(str(exc))
    for service in config.services:
        if service.require_header is not None:
            try:  # as load_service_secrets reads it
                keys.load_header_secret(service.require_header.value_file)
            except KeyFileError as exc:
                problems.append(str(exc))
    if problems:
        raise KeyFileError("\n".join(problems))
    return notes


def _cmd_reload(args: argparse.Namespace) -> int:
    config = _load(args)  # an invalid config exits 2 here, before the daemon hears of it
    ifname = config.interface.name
    pid = running_daemon_pid(ifname)
    if pid is None:
        print(f"tunneld reload: no running tunneld manages {ifname}", file=sys.stderr)
        return EXIT_FAILURE
    check_secret_files(config, creating=False)  # as are key files the daemon would refuse
    os.kill(pid, signal.SIGHUP)
    print(f"asked tunneld (pid {pid}, interface {ifname}) to reload; its log says what changed")
    return EXIT_OK


def _cmd_route_test(args: argparse.Namespace) -> int:
    try:
        host, target = split_test_url(args.url)
    except ValueError as exc:
        print(f"tunneld route-test: {exc}", file=sys.stderr)
        return EXIT_USAGE
    router = Router(_load(args).services)
    try:  # the proxy matches the canonical path (tunneld.proxy.paths), and so does this
        canonical = normalize_target(target.encode("utf-8")).decode("utf-8")
        service = router.match(host, canonical)
    except PathError as exc:
        print(f"{args.url} → refused (400): {exc}")
        return EXIT_FAILURE
    if service is None:
        print(f"{args.url} → no service (404)")
        return EXIT_FAILURE
    print(f"{args.url} → {describe_route(router.rules.index(service) + 1, service)}")
    return EXIT_OK


def split_test_url(url: str) -> tuple[str, str]:
    """``http://billing:80/v1/x?a=1`` → (``billing:80``, ``/v1/x?a=1``): Host and target."""
    bad = f"{shown(url)} is not an http:// or https:// URL with a host, e.g. http://billing/v1/x"
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ValueError(bad)
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not an integer up to 65535
    except ValueError:
        raise ValueError(bad) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(bad)
    host = parts.netloc.rpartition("@")[2]  # no user:password in a Host header
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, target


def describe_route(rule_number: int, service: ServiceConfig) -> str:
    """``service "billing" (rule 1: hosts billing; path /v1) → http://127.0.0.1:8080``."""
    hosts = ", ".join(service.hosts)
    text = (
        f"service {quote(service.name)} (rule {rule_number}: hosts {hosts}; "
        f"path {service.path_prefix}) → {service.upstream}"
    )
    if service.host_rewrite is not None:
        text += f" (Host: {service.host_rewrite})"
    return text


def _cmd_genkey(args: argparse.Namespace) -> int:
    print(keys.encode_key(keys.generate_private_key()))
    return EXIT_OK


def _cmd_pubkey(args: argparse.Namespace) -> int:
    try:
        private_key = keys.decode_key(sys.stdin.read(), what="private key")
    except ValueError as exc:
        print(f"tunneld pubkey: standard input: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(keys.encode_key(keys.public_key(private_key)))
    return EXIT_OK


def _cmd_install_systemd(args: argparse.Namespace) -> int:
    from tunneld import install  # only this command needs it

    try:
        request = install.parse_request(
            root=args.root,
            config=args.config,
            addresses=args.address,
            gateway_endpoints=args.gateway_endpoint,
            gateway_public_key=args.gateway_public_key,
            gateway_addresses=args.gateway_address,
        )
    except install.UsageProblems as exc:
        for problem in exc.problems:
            print(f"tunneld install-systemd: {problem}", file=sys.stderr)
        return EXIT_USAGE
    return install.install_systemd(request)


_COMMANDS = {
    "run": _cmd_run,
    "up": _cmd_up,
    "down": _cmd_down,
    "status": _cmd_status,
    "check-config": _cmd_check_config,
    "ready": _cmd_ready,
    "reload": _cmd_reload,
    "route-test": _cmd_route_test,
    "genkey": _cmd_genkey,
    "pubkey": _cmd_pubkey,
    "install-systemd": _cmd_install_systemd,
}
