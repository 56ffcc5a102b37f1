"""Configuration: one TOML file plus ``TUNNELD_*`` environment overrides → frozen dataclasses.

How this works (the generic parts, which know no section of tunneld, are in ``config_reader``):

1. ``read_toml_file`` parses the TOML file (when there is one) into a plain dict.
2. ``_overlay_env`` writes every ``TUNNELD_<TABLE>_<KEY>`` / ``TUNNELD_<ARRAY>_<N>_<KEY>``
   variable into that dict *as a string* and remembers which variable set which key path.
   ``TUNNELD_SERVICE_<N>_TLS_CA_FILE`` reaches into the sub-table ``tls`` (``_ENV_SUBTABLES``).
3. One small function per section (``_interface``, ``_gateway``; ``[proxy]`` and ``[[service]]``
   in ``config_proxy``) reads its table through ``Table``. A read converts the value to the
   key's type (environment strings are parsed there), records a problem instead of raising, and
   returns a fallback so that validation goes on. ``Table.done`` reports every key nobody read
   as unknown. Rules spanning sections (duplicates, overlaps, an upstream that is one of
   tunneld's own listeners: ``config_loops``) run last, each in time linear in the entries.
4. If any problem was recorded, one ``ConfigError`` carries all of them, one per line:
   ``<file or "environment">: <key path or variable>: <what is wrong / what was expected>``.

Key files are never read here: ``KeySource`` only says where a key lives; ``keys.py`` loads it.
``HostPort``, the endpoint syntax that ``config_proxy`` shares, lives in ``host_port``; it is
re-exported here, where most callers import it from.

``[health]`` is read before the gateways (``config_health``): each gateway's ``probe_address``
is checked against the probe it configures.

To add a section (``[metrics]``): a dataclass, a function ``_metrics(ctx, raw)`` that reads it
through ``Table`` (in a module of its own if it is large, like ``config_proxy``), a call in
``_config``, a field of ``Config``, a block in ``render_config``; list it in
``_ENV_TABLES``/``_ENV_ARRAYS`` for env access.
"""

# ruff: noqa: RUF001 -- messages write ranges with an en dash (U+2013) on purpose

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast, get_args

from tunneld import keys
from tunneld.config_health import (
    HealthConfig,
    check_handshake_only,
    read_health,
    read_probe_address,
    render_health,
    render_probe_address,
)
from tunneld.config_loops import check_upstream_loops
from tunneld.config_metrics import (
    MetricsConfig,
    check_ready_services,
    read_metrics,
    render_metrics,
)
from tunneld.config_proxy import (
    ProxyConfig,
    ServiceConfig,
    check_services,
    read_proxy,
    read_service,
    render_proxy,
    render_service,
)
from tunneld.config_reader import (
    Context,
    KeyPath,
    Table,
    dotted,
    file_path,
    quote,
    read_toml_file,
    shown,
    shown_name,
    shown_path,
    toml_value,
)
from tunneld.errors import ConfigError
from tunneld.host_port import HostPort as HostPort  # re-exported: callers import it from here
from tunneld.wireguard.model import IPAddress, IPNetwork

BackendChoice = Literal["auto", "kernel", "userspace"]
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

DEFAULT_CONFIG_PATH = Path("/etc/tunneld/tunneld.toml")
DEFAULT_PRIVATE_KEY_FILE = Path("/var/lib/tunneld/private.key")

#: ``TUNNELD_*`` variables that other modules read: config does not call them unknown.
RESERVED_ENV = frozenset({"TUNNELD_CONFIG", "TUNNELD_LOG_LEVEL", "TUNNELD_LOG_FORMAT"})

# 1280 is IPv6's minimum link MTU: Linux removes IPv6 addresses from a link with a smaller one,
# and tunnel addresses are often IPv6. 65535 is the largest IP packet. The usual value, 1420,
# is 1500 minus WireGuard's 80 bytes of overhead over IPv6.
MTU_MIN, MTU_MAX = 1280, 65535

# Sections reachable from the environment: [table] ← TUNNELD_TABLE_<KEY>,
# [[array]] ← TUNNELD_ARRAY_<N>_<KEY>, a sub-table of an entry ← TUNNELD_ARRAY_<N>_<SUB>_<KEY>
# (no key of those entries starts with a sub-table's name and "_").
_ENV_TABLES = ("interface", "health", "proxy", "metrics")
_ENV_ARRAYS = ("gateway", "service")
_ENV_SUBTABLES = {"service": ("require_header", "tls")}

_IFNAME_RE = re.compile(r"[A-Za-z0-9_.=+-]+")
_GATEWAY_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")
# Keys people write by mistake, and what to write instead.
_UNKNOWN_KEY_HINTS = {
    "private_key": "keys are never inline: put it in a 0600 file, set private_key_file",
    "preshared_key": "keys are never inline: put it in a 0600 file, set preshared_key_file",
    "value": "secrets are never inline: put it in a 0600 file, set value_file",
}


@dataclass(frozen=True)
class KeySource:
    """Where a key lives; for a systemd credential, ``path`` is resolved at load time."""

    path: Path
    credential: str | None = None

    def describe(self) -> str:
        if self.credential is None:
            return f"file {self.path}"
        return f"systemd credential {self.credential} ({self.path})"


@dataclass(frozen=True)
class InterfaceConfig:
    private_key: KeySource
    addresses: tuple[IPInterface, ...]
    name: str = "tunneld0"
    listen_port: int | None = None
    fwmark: int = 0
    mtu: int = 1420
    backend: BackendChoice = "auto"
    userspace_binary: str = "wireguard-go"
    # tunneld's nftables table on the interface (wireguard/firewall.py); false: the host's own.
    firewall: bool = True


@dataclass(frozen=True)
class GatewayConfig:
    name: str
    public_key: bytes  # 32 raw bytes
    endpoints: tuple[HostPort, ...]  # failover order
    allowed_ips: tuple[IPNetwork, ...]
    persistent_keepalive_seconds: int = 25
    preshared_key: KeySource | None = None
    # Probed through the tunnel (health.probe); None: judged by its handshake alone.
    probe_address: IPAddress | None = None


@dataclass(frozen=True)
class Config:
    source: str  # the file path as given, or "environment"
    interface: InterfaceConfig
    gateways: tuple[GatewayConfig, ...]
    health: HealthConfig = field(default_factory=HealthConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    services: tuple[ServiceConfig, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# --- sections -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KeyDirs:
    """The directories that key locations in the config are resolved against."""

    # The config file's directory, else the working directory; None if that no longer exists.
    relative_to: Path | None
    credentials: Path | None  # $CREDENTIALS_DIRECTORY


def _interface(ctx: Context, key_dirs: _KeyDirs, raw: dict[str, object]) -> InterfaceConfig:
    table = Table(ctx, ("interface",), raw)
    name = table.text("name", "tunneld0")
    size = len(name.encode())
    if not 1 <= size <= 15:
        table.problem("name", f"{shown(name)} is {size} bytes long; Linux allows 1–15")
    elif not _IFNAME_RE.fullmatch(name) or name in (".", ".."):
        table.problem("name", f"{shown(name)} is not an interface name (A-Z a-z 0-9 _ . = + -)")
    private_key = _key_source(table, key_dirs, "private_key") or KeySource(DEFAULT_PRIVATE_KEY_FILE)
    addresses = _addresses(table)
    listen_port = table.optional_integer("listen_port", 1, 65535)
    fwmark = table.integer("fwmark", 0, 0, 0xFFFFFFFF)
    mtu = table.integer("mtu", 1420, MTU_MIN, MTU_MAX)
    backend = table.text("backend", "auto")
    if backend not in get_args(BackendChoice):
        table.problem("backend", f'{shown(backend)} is not one of "auto", "kernel", "userspace"')
    userspace_binary = table.text("userspace_binary", "wireguard-go")
    if not userspace_binary:
        table.problem("userspace_binary", "must not be empty; expected a command or path")
    firewall = table.boolean("firewall", True)
    table.done()
    return InterfaceConfig(
        private_key=private_key,
        addresses=addresses,
        name=name,
        listen_port=listen_port,
        fwmark=fwmark,
        mtu=mtu,
        backend=cast(BackendChoice, backend),
        userspace_binary=userspace_binary,
        firewall=firewall,
    )


def _key_source(table: Table, key_dirs: _KeyDirs, prefix: str) -> KeySource | None:
    """``<prefix>_file`` or ``<prefix>_credential``, at most one; None when neither (or bad)."""
    file = table.optional_text(f"{prefix}_file")
    credential = table.optional_text(f"{prefix}_credential")
    if file is not None and credential is not None:
        table.problem(f"{prefix}_credential", f"{prefix}_file is set too; use one of them")
        return None
    if file is not None:
        try:
            return KeySource(file_path(file, key_dirs.relative_to))
        except ValueError as exc:
            table.problem(f"{prefix}_file", str(exc))
            return None
    if credential is None:
        return None
    if not credential or "/" in credential or "\0" in credential or credential in (".", ".."):
        table.problem(
            f"{prefix}_credential",
            f"{shown(credential)} is not a credential name (a file name: no '/', not . or ..)",
        )
        return None
    if key_dirs.credentials is None:
        table.problem(
            f"{prefix}_credential",
            f"$CREDENTIALS_DIRECTORY is not set: the systemd unit needs "
            f"LoadCredential={credential}:/path/to/key (or SetCredential=), "
            f"or use {prefix}_file instead",
        )
        return None
    return KeySource(key_dirs.credentials / credential, credential=credential)


def _addresses(table: Table) -> tuple[IPInterface, ...]:
    addresses: list[IPInterface] = []
    seen: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, KeyPath] = {}
    for path, text in table.strings("address", 'addresses with prefix, e.g. ["10.44.0.2/24"]'):
        try:
            address = ipaddress.ip_interface(text)
        except ValueError:
            table.ctx.add(path, f"{shown(text)} is not an IP address/prefix, e.g. 10.44.0.2/24")
            continue
        if "/" not in text:
            example = f"{text}/{24 if address.version == 4 else 64}"
            table.ctx.add(path, f"{shown(text)} has no prefix length; write it as {example}")
        elif address.ip in seen:
            table.ctx.add(path, f"{shown(text)} repeats {dotted(seen[address.ip])}")
        else:
            seen[address.ip] = path
            addresses.append(address)
    return tuple(addresses)


def _gateway(
    ctx: Context,
    key_dirs: _KeyDirs,
    health: HealthConfig,
    interface: InterfaceConfig,
    index: int,
    raw: dict[str, object],
) -> GatewayConfig:
    table = Table(ctx, ("gateway", index), raw)
    name = table.text("name", f"gateway-{index}")
    if not _GATEWAY_NAME_RE.fullmatch(name):
        table.problem("name", f"{shown(name)} is not a gateway name ([A-Za-z0-9_.-], 1–63 chars)")
    public_key = b""
    encoded = table.required_text("public_key", "the gateway's base64 public key")
    if encoded is not None:  # None: missing or not a string, which is reported already
        try:
            public_key = keys.decode_key(encoded, what="public key")
        except ValueError as exc:
            table.problem("public_key", str(exc))
    endpoints = []
    for path, text in table.strings("endpoints", 'host:port strings, e.g. ["gw.example:51820"]'):
        try:
            endpoints.append(HostPort.parse(text))
        except ValueError as exc:
            ctx.add(path, f"{shown(text)} is not host:port ({exc})")
    allowed_ips = _allowed_ips(table)
    keepalive = table.integer("persistent_keepalive", 25, 0, 65535)
    preshared_key = _key_source(table, key_dirs, "preshared_key")
    probe_address = read_probe_address(table, health, allowed_ips, interface.addresses)
    check_handshake_only(table, health, keepalive, probe_address)
    table.done()
    return GatewayConfig(
        name, public_key, tuple(endpoints), allowed_ips, keepalive, preshared_key, probe_address
    )


def _allowed_ips(table: Table) -> tuple[IPNetwork, ...]:
    networks = []
    for path, text in table.strings("allowed_ips", 'networks, e.g. ["10.44.0.1/32"]'):
        try:
            network = ipaddress.ip_network(text, strict=False)  # host bits masked, as `wg` does
        except ValueError:
            table.ctx.add(path, f"{shown(text)} is not an IP network, e.g. 10.44.0.1/32")
            continue
        if network.prefixlen == 0:
            table.ctx.add(
                path,
                f"{shown(text)} is a default route: tunneld never routes all traffic through "
                "the tunnel; list the gateway's tunnel address, e.g. 10.44.0.1/32",
            )
            continue
        networks.append(network)
    return tuple(networks)


def _check_gateways(ctx: Context, gateways: tuple[GatewayConfig, ...]) -> None:
    """Rules across gateways: unique names and keys, no address routed to two peers."""
    first_with_name: dict[str, int] = {}
    first_with_key: dict[bytes, int] = {}
    overlaps = _overlapping_allowed_ips(gateways)
    for index, gateway in enumerate(gateways):
        if gateway.name in first_with_name:
            first = first_with_name[gateway.name]
            message = f"{shown(gateway.name)} is taken by gateway[{first}]"
            ctx.add(("gateway", index, "name"), message)
        first_with_name.setdefault(gateway.name, index)
        if gateway.public_key in first_with_key:
            first = first_with_key[gateway.public_key]
            message = f"same key as gateway[{first}]; each gateway is a distinct peer"
            ctx.add(("gateway", index, "public_key"), message)
        if gateway.public_key:  # b"" = invalid, already reported
            first_with_key.setdefault(gateway.public_key, index)
        for earlier_index, network, taken in overlaps.get(index, []):
            ctx.add(
                ("gateway", index, "allowed_ips"),
                f"{network} overlaps {taken} of gateway[{earlier_index}]; "
                "WireGuard routes an address to one peer only",
            )


#: One allowed_ips entry: (gateway index, position in its allowed_ips, network).
_Placed = tuple[int, int, IPNetwork]


def _overlapping_allowed_ips(
    gateways: tuple[GatewayConfig, ...],
) -> dict[int, list[tuple[int, IPNetwork, IPNetwork]]]:
    """For each gateway, ``(earlier gateway, network, its network)`` for every network of it
    that overlaps one of an earlier gateway, in the order of a loop over earlier gateways,
    then its networks, then theirs.

    Two networks overlap only if one contains the other. So after sorting by first address
    (wider first), the networks that contain one are exactly those still open on a stack when
    it comes: linear work plus one step per overlapping pair, where comparing every pair took
    seconds for thousands of gateways.
    """
    found: list[tuple[int, int, int, int, IPNetwork, IPNetwork]] = []
    for version in (4, 6):
        placed: list[_Placed] = [
            (index, position, network)
            for index, gateway in enumerate(gateways)
            for position, network in enumerate(gateway.allowed_ips)
            if network.version == version
        ]
        placed.sort(key=lambda entry: (int(entry[2].network_address), entry[2].prefixlen))
        open_: list[_Placed] = []  # nested: each contains the next
        for entry in placed:
            start = int(entry[2].network_address)
            while open_ and int(open_[-1][2].broadcast_address) < start:
                open_.pop()
            for other in open_:
                (index, position, network), (other_index, other_position, taken) = entry, other
                if index > other_index:
                    found.append((index, other_index, position, other_position, network, taken))
                elif other_index > index:
                    found.append((other_index, index, other_position, position, taken, network))
            open_.append(entry)
    found.sort(key=lambda pair: pair[:4])
    overlaps: dict[int, list[tuple[int, IPNetwork, IPNetwork]]] = {}
    for index, earlier_index, _, _, network, taken in found:
        overlaps.setdefault(index, []).append((earlier_index, network, taken))
    return overlaps


def _config(ctx: Context, key_dirs: _KeyDirs, raw: dict[str, object], source: str) -> Config:
    root = Table(ctx, (), raw)
    interface = _interface(ctx, key_dirs, root.table("interface"))
    health = read_health(ctx, root.table("health"))
    tables = root.tables("gateway")
    gateways = tuple(
        _gateway(ctx, key_dirs, health, interface, i, table) for i, table in enumerate(tables)
    )
    if not gateways and isinstance(raw.get("gateway", []), list):  # else: the type is reported
        ctx.add(("gateway",), "missing; at least one [[gateway]] table is required")
    _check_gateways(ctx, gateways)
    networks = [network for gateway in gateways for network in gateway.allowed_ips]
    proxy = read_proxy(ctx, root.table("proxy"), networks)
    tables = root.tables("service")
    services = tuple(
        read_service(ctx, key_dirs.relative_to, i, table) for i, table in enumerate(tables)
    )
    check_services(ctx, proxy, services)
    metrics = read_metrics(ctx, root.table("metrics"))
    check_ready_services(ctx, metrics, [service.name for service in services])
    check_upstream_loops(ctx, interface.addresses, proxy, services, metrics)
    root.done()
    return Config(source, interface, gateways, health, proxy, services, metrics)


# --- environment and load_config ------------------------------------------------------------


def _env_target(variable: str) -> tuple[str, int | None, str] | None:
    """``TUNNELD_INTERFACE_MTU`` → ("interface", None, "mtu"); GATEWAY_<N>_ gives an index."""
    rest = variable.removeprefix("TUNNELD_")
    for section in _ENV_TABLES:
        match = re.fullmatch(rf"{section.upper()}_([A-Z][A-Z0-9_]*)", rest)
        if match:
            return section, None, match[1].lower()
    for section in _ENV_ARRAYS:
        # At most 9 digits: int() refuses thousands, and any such index leaves a gap anyway.
        match = re.fullmatch(rf"{section.upper()}_(0|[1-9][0-9]{{0,8}})_([A-Z][A-Z0-9_]*)", rest)
        if match:
            return section, int(match[1]), match[2].lower()
    return None


def _overlay_env(ctx: Context, raw: dict[str, object], environ: Mapping[str, str]) -> None:
    """Write ``TUNNELD_*`` overrides into ``raw`` as strings; ``Table`` converts them."""
    indexed: list[tuple[str, int, str, str]] = []
    for variable in sorted(environ):
        if not variable.startswith("TUNNELD_") or variable in RESERVED_ENV:
            continue
        target = _env_target(variable)
        if target is None:
            forms = [f"TUNNELD_{name.upper()}_<KEY>" for name in _ENV_TABLES]
            forms += [f"TUNNELD_{name.upper()}_<N>_<KEY>" for name in _ENV_ARRAYS]
            expected = ", ".join(forms + sorted(RESERVED_ENV))
            ctx.problems.append(
                f"environment: {shown_name(variable)}: unknown variable; expected {expected}"
            )
            continue
        section, index, key = target
        if index is not None:
            indexed.append((section, index, key, variable))
            continue
        table = raw.setdefault(section, {})
        if isinstance(table, dict):  # else: the type error is reported by Table
            _set_env_value(ctx, (section,), table, key, variable, environ[variable])
    for section, index, key, variable in sorted(indexed):  # by index, so appends are in order
        tables = raw.setdefault(section, [])
        if not isinstance(tables, list):
            continue
        if index == len(tables):
            tables.append({})
        if index > len(tables):
            ctx.problems.append(
                f"environment: {shown_name(variable)}: index {index} leaves a gap: there is no "
                f"{section} {len(tables)} in the file or environment (indices are 0-based, "
                "contiguous)"
            )
        elif isinstance(tables[index], dict):
            _set_env_value(ctx, (section, index), tables[index], key, variable, environ[variable])


def _set_env_value(
    ctx: Context, path: KeyPath, table: dict[str, object], key: str, variable: str, value: str
) -> None:
    """``table[key] = value``, or ``table[sub][rest] = value`` for a sub-table key ``sub_rest``."""
    for sub in _ENV_SUBTABLES.get(str(path[0]), ()):
        if key.startswith(f"{sub}_"):
            nested = table.setdefault(sub, {})
            if not isinstance(nested, dict):  # the type error is reported by Table
                return
            path, table, key = (*path, sub), nested, key.removeprefix(f"{sub}_")
            break
    table[key] = value
    ctx.env_origins[(*path, key)] = variable


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (else ``$TUNNELD_CONFIG``, else the default file if it exists, else
    nothing) and overlay ``TUNNELD_*`` variables; raise one ``ConfigError`` listing every problem.
    """
    env = os.environ if environ is None else environ
    if path is not None:
        raw = read_toml_file(path, shown_path(str(path)))
    elif "TUNNELD_CONFIG" in env:
        if not env["TUNNELD_CONFIG"]:
            raise ConfigError("environment: TUNNELD_CONFIG: empty; expected a file path")
        path = Path(env["TUNNELD_CONFIG"])
        raw = read_toml_file(path, f"environment: TUNNELD_CONFIG: {shown_path(str(path))}")
    else:
        path = DEFAULT_CONFIG_PATH
        raw = read_toml_file(path, str(path), required=False)
    if raw is None:  # no default file: the environment alone
        raw, source, key_dir = {}, "environment", _absolute(Path())
    else:
        source, key_dir = str(path), _absolute(path.parent)
    credentials_dir = env.get("CREDENTIALS_DIRECTORY")
    key_dirs = _KeyDirs(key_dir, Path(credentials_dir) if credentials_dir else None)
    ctx = Context(shown_path(source), unknown_key_hints=_UNKNOWN_KEY_HINTS)
    _overlay_env(ctx, raw, env)
    config = _config(ctx, key_dirs, raw, source)
    if ctx.problems:
        raise ConfigError(ctx.problems)
    return config


def _absolute(path: Path) -> Path | None:
    """``path`` made absolute; None if that needs the working directory and it was deleted."""
    try:
        return path.absolute()
    except OSError:  # getcwd() fails with ENOENT
        return None


# --- rendering ------------------------------------------------------------------------------


def _render_key_source(prefix: str, source: KeySource) -> list[str]:
    if source.credential is None:
        return [f"{prefix}_file = {quote(str(source.path))}"]
    return [f"{prefix}_credential = {quote(source.credential)}  # {quote(str(source.path))}"]


def render_config(config: Config) -> str:
    """The effective configuration as TOML that ``load_config`` reads back to an equal Config.

    Only key *locations* and public keys appear: config never holds secret key material.
    """
    interface = config.interface
    lines = [
        "# effective configuration (file + environment)",
        f"# source: {quote(config.source)}",
        "",
        "[interface]",
        f"name = {quote(interface.name)}",
        *_render_key_source("private_key", interface.private_key),
        f"address = {toml_value(interface.addresses)}",
    ]
    if interface.listen_port is not None:
        lines.append(f"listen_port = {interface.listen_port}")
    lines += [
        f"fwmark = {interface.fwmark:#x}",
        f"mtu = {interface.mtu}",
        f"backend = {quote(interface.backend)}",
        f"userspace_binary = {quote(interface.userspace_binary)}",
        f"firewall = {toml_value(interface.firewall)}",
    ]
    for gateway in config.gateways:
        lines += [
            "",
            "[[gateway]]",
            f"name = {quote(gateway.name)}",
            f"public_key = {quote(base64.b64encode(gateway.public_key).decode())}",
            f"endpoints = {toml_value(gateway.endpoints)}",
            f"allowed_ips = {toml_value(gateway.allowed_ips)}",
            f"persistent_keepalive = {gateway.persistent_keepalive_seconds}",
        ]
        if gateway.preshared_key is not None:
            lines += _render_key_source("preshared_key", gateway.preshared_key)
        lines.append(render_probe_address(gateway.probe_address))
    lines += render_health(config.health)
    lines += render_proxy(config.proxy)
    for service in config.services:
        lines += render_service(service)
    lines += render_metrics(config.metrics)
    return "\n".join(lines) + "\n"
