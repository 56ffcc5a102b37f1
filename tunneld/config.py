"""Configuration: one TOML file plus ``TUNNELD_*`` environment overrides → frozen dataclasses.

How this works:

1. ``_read_file`` parses the TOML file (when there is one) into a plain dict.
2. ``_overlay_env`` writes every ``TUNNELD_INTERFACE_<KEY>`` / ``TUNNELD_GATEWAY_<N>_<KEY>``
   variable into that dict *as a string* and remembers which variable set which key path.
3. One small function per section (``_interface``, ``_gateway``) reads its table through
   ``_Table``. A read converts the value to the key's type (environment strings are parsed
   there: comma lists, decimal or 0x ints), records a problem instead of raising, and returns
   a fallback so that validation goes on. ``_Table.done`` reports every key nobody read as
   unknown. Rules spanning sections (duplicates, overlaps) run last.
4. If any problem was recorded, one ``ConfigError`` carries all of them, one per line:
   ``<file or "environment">: <key path or variable>: <what is wrong / what was expected>``.

Key files are never read here: ``KeySource`` only says where a key lives; ``keys.py`` loads it.

To add a section (``[health]``, ``[metrics]``, ``[[service]]``): a dataclass, a function
``_health(ctx, table)`` that reads it through ``_Table``, a call in ``_config``, a field of
``Config``, a block in ``render_config``; list it in ``_ENV_TABLES``/``_ENV_ARRAYS`` for env access.
"""

# ruff: noqa: RUF001 -- messages write ranges with an en dash (U+2013) on purpose

from __future__ import annotations

import base64
import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast, get_args

from tunneld import keys
from tunneld.errors import ConfigError
from tunneld.wireguard.model import IPNetwork

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
# [[array]] ← TUNNELD_ARRAY_<N>_<KEY>.
_ENV_TABLES = ("interface",)
_ENV_ARRAYS = ("gateway",)

_IFNAME_RE = re.compile(r"[A-Za-z0-9_.=+-]+")
_GATEWAY_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")
# Underscores are not legal in host names but resolvers accept them and internal names use them.
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_ENV_INT_RE = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
_UNKNOWN_KEY_HINTS = {
    "private_key": "keys are never inline: put it in a 0600 file, set private_key_file",
    "preshared_key": "keys are never inline: put it in a 0600 file, set preshared_key_file",
}

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class HostPort:
    """An unresolved endpoint from config: a DNS name or IP literal (IPv6 without brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """Parse ``host:port`` or ``[v6]:port``; ``ValueError`` says what is wrong."""
        if text.startswith("["):
            host, bracket, port = text[1:].partition("]:")
            if not bracket:
                raise ValueError("missing :port after the bracketed address")
            try:
                host = str(ipaddress.IPv6Address(host))
            except ValueError:
                raise ValueError("not a valid IPv6 address inside the brackets") from None
        else:
            host, colon, port = text.rpartition(":")
            if not colon:
                raise ValueError("missing :port")
            if ":" in host:
                raise ValueError("an IPv6 address needs brackets, e.g. [2001:db8::1]:51820")
            host = _check_host(host)
        if not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
            raise ValueError("port 1–65535")
        return cls(host, int(port))


def _check_host(host: str) -> str:
    """An IPv4 literal (returned canonical) or a DNS name (returned as is)."""
    if not host:
        raise ValueError("empty host")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError("not a valid IPv4 address") from None
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError("not a DNS name: letters, digits, '-', '_', dot-separated labels")
    return host


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


@dataclass(frozen=True)
class GatewayConfig:
    name: str
    public_key: bytes  # 32 raw bytes
    endpoints: tuple[HostPort, ...]  # failover order
    allowed_ips: tuple[IPNetwork, ...]
    persistent_keepalive_seconds: int = 25
    preshared_key: KeySource | None = None


@dataclass(frozen=True)
class Config:
    source: str  # the file path as given, or "environment"
    interface: InterfaceConfig
    gateways: tuple[GatewayConfig, ...]


# --- problem collection and typed reads -----------------------------------------------------


def _quote(text: str) -> str:
    """A TOML basic string, for values in messages and in ``render_config``."""
    # JSON's escapes are all valid in TOML; TOML also wants DEL escaped, JSON leaves it raw.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, list):
        return "array"
    return "table" if isinstance(value, dict) else type(value).__name__  # datetime, date, time


def _dotted(path: KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def _env_name(path: KeyPath) -> str:
    return "_".join(str(part).upper() for part in ("TUNNELD", *path))


@dataclass
class _Context:
    label: str  # the file name as the user gave it, or "environment"
    key_dir: Path  # relative key file paths are relative to this
    credentials_dir: str | None  # $CREDENTIALS_DIRECTORY
    env_origins: dict[KeyPath, str] = field(default_factory=dict)  # key path → variable
    problems: list[str] = field(default_factory=list)

    def env_variable(self, path: KeyPath) -> str | None:
        """The variable that set ``path`` (or the list that ``path`` is an item of)."""
        for end in range(len(path), 0, -1):
            if path[:end] in self.env_origins:
                return self.env_origins[path[:end]]
        return None

    def add(self, path: KeyPath, message: str) -> None:
        variable = self.env_variable(path)
        if variable is not None:
            self.problems.append(f"environment: {variable}: {message}")
        else:
            self.problems.append(f"{self.label}: {_dotted(path) or 'top level'}: {message}")


class _Table:
    """Typed reads from one TOML table; a bad value becomes a problem and a fallback."""

    def __init__(self, ctx: _Context, path: KeyPath, raw: dict[str, object]) -> None:
        self.ctx, self.path, self.raw = ctx, path, raw
        self.known: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.ctx.add((*self.path, key), message)

    def _get(self, key: str) -> object | None:  # TOML has no null: None means absent
        self.known.append(key)
        return self.raw.get(key)

    def _env_text(self, key: str, value: object) -> str | None:
        from_env = (*self.path, key) in self.ctx.env_origins
        return value if from_env and isinstance(value, str) else None

    def missing(self, key: str, expected: str) -> None:
        env = _env_name((*self.path, key))
        self.problem(key, f"missing; expected {expected} (in the file or as {env})")

    def optional_text(self, key: str) -> str | None:
        value = self._get(key)
        if value is None or isinstance(value, str):
            return value
        self.problem(key, f"expected a string, got {_describe(value)}")
        return None

    def text(self, key: str, default: str) -> str:
        value = self.optional_text(key)
        return default if value is None else value

    def optional_integer(self, key: str, low: int, high: int) -> int | None:
        value = self._get(key)
        env_text = self._env_text(key, value)
        if env_text is not None:
            if not _ENV_INT_RE.fullmatch(env_text.strip()):
                self.problem(key, f"{_quote(env_text)} is not an integer (decimal or 0x-hex)")
                return None
            value = int(env_text.strip(), 16 if "x" in env_text.lower() else 10)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, f"expected an integer, got {_describe(value)}")
            return None
        if not low <= value <= high:
            self.problem(key, f"{value} is out of range (expected {low}–{high})")
            return None
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.optional_integer(key, low, high)
        return default if value is None else value

    def strings(self, key: str, expected: str) -> list[tuple[KeyPath, str]]:
        """A required, non-empty list of strings, each with its own key path."""
        value = self._get(key)
        env_text = self._env_text(key, value)
        if env_text is not None:
            value = [item.strip() for item in env_text.split(",") if item.strip()]
        if value is None:
            self.missing(key, expected)
            return []
        if not isinstance(value, list):
            self.problem(key, f"expected a list of {expected}, got {_describe(value)}")
            return []
        if not value:
            self.problem(key, f"must not be empty; expected {expected}")
        items = []
        for index, item in enumerate(value):
            if isinstance(item, str):
                items.append(((*self.path, key, index), item))
            else:
                self.ctx.add((*self.path, key, index), f"expected a string, got {_describe(item)}")
        return items

    def table(self, key: str) -> dict[str, object]:
        value = self._get(key)
        if value is None or isinstance(value, dict):
            return value or {}
        self.problem(key, f"expected a table [{key}], got {_describe(value)}")
        return {}

    def tables(self, key: str) -> list[dict[str, object]]:
        value = self._get(key)
        if value is None:
            return []
        if isinstance(value, list) and all(isinstance(item, dict) for item in value):
            return value
        self.problem(key, f"expected an array of tables [[{key}]], got {_describe(value)}")
        return []

    def done(self) -> None:
        """Report every key that no read asked for: a typo must not pass silently."""
        for key in self.raw:
            if key in self.known:
                continue
            path = (*self.path, key)
            close = difflib.get_close_matches(key, self.known, n=1)
            if self.ctx.env_variable(path) is not None:
                message = "unknown variable"
                suggestion = _env_name((*self.path, close[0])) if close else None
            else:
                message = "unknown key"
                suggestion = _quote(close[0]) if close else None
            if suggestion:
                message += f"; did you mean {suggestion}?"
            if key in _UNKNOWN_KEY_HINTS:
                message += f"; {_UNKNOWN_KEY_HINTS[key]}"
            self.ctx.add(path, message)


# --- sections -------------------------------------------------------------------------------


def _interface(ctx: _Context, raw: dict[str, object]) -> InterfaceConfig:
    table = _Table(ctx, ("interface",), raw)
    name = table.text("name", "tunneld0")
    size = len(name.encode())
    if not 1 <= size <= 15:
        table.problem("name", f"{_quote(name)} is {size} bytes long; Linux allows 1–15")
    elif not _IFNAME_RE.fullmatch(name) or name in (".", ".."):
        table.problem("name", f"{_quote(name)} is not an interface name (A-Z a-z 0-9 _ . = + -)")
    private_key = _key_source(table, "private_key") or KeySource(DEFAULT_PRIVATE_KEY_FILE)
    addresses = _addresses(table)
    listen_port = table.optional_integer("listen_port", 1, 65535)
    fwmark = table.integer("fwmark", 0, 0, 0xFFFFFFFF)
    mtu = table.integer("mtu", 1420, MTU_MIN, MTU_MAX)
    backend = table.text("backend", "auto")
    if backend not in get_args(BackendChoice):
        table.problem("backend", f'{_quote(backend)} is not one of "auto", "kernel", "userspace"')
    userspace_binary = table.text("userspace_binary", "wireguard-go")
    if not userspace_binary:
        table.problem("userspace_binary", "must not be empty; expected a command or path")
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
    )


def _key_source(table: _Table, prefix: str) -> KeySource | None:
    """``<prefix>_file`` or ``<prefix>_credential``, at most one; None when neither (or bad)."""
    file = table.optional_text(f"{prefix}_file")
    credential = table.optional_text(f"{prefix}_credential")
    if file is not None and credential is not None:
        table.problem(f"{prefix}_credential", f"{prefix}_file is set too; use one of them")
        return None
    if file is not None:
        if not file:
            table.problem(f"{prefix}_file", "must not be empty; expected a file path")
            return None
        return KeySource(table.ctx.key_dir / file)  # an absolute `file` replaces key_dir
    if credential is None:
        return None
    if not credential or "/" in credential or "\0" in credential or credential in (".", ".."):
        table.problem(
            f"{prefix}_credential",
            f"{_quote(credential)} is not a credential name (a file name: no '/', not . or ..)",
        )
        return None
    if table.ctx.credentials_dir is None:
        table.problem(
            f"{prefix}_credential",
            f"$CREDENTIALS_DIRECTORY is not set: the systemd unit needs "
            f"LoadCredential={credential}:/path/to/key (or SetCredential=), "
            f"or use {prefix}_file instead",
        )
        return None
    return KeySource(Path(table.ctx.credentials_dir) / credential, credential=credential)


def _addresses(table: _Table) -> tuple[IPInterface, ...]:
    addresses: list[IPInterface] = []
    seen: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, KeyPath] = {}
    for path, text in table.strings("address", 'addresses with prefix, e.g. ["10.44.0.2/24"]'):
        try:
            address = ipaddress.ip_interface(text)
        except ValueError:
            table.ctx.add(path, f"{_quote(text)} is not an IP address/prefix, e.g. 10.44.0.2/24")
            continue
        if "/" not in text:
            example = f"{text}/{24 if address.version == 4 else 64}"
            table.ctx.add(path, f"{_quote(text)} has no prefix length; write it as {example}")
        elif address.ip in seen:
            table.ctx.add(path, f"{_quote(text)} repeats {_dotted(seen[address.ip])}")
        else:
            seen[address.ip] = path
            addresses.append(address)
    return tuple(addresses)


def _gateway(ctx: _Context, index: int, raw: dict[str, object]) -> GatewayConfig:
    table = _Table(ctx, ("gateway", index), raw)
    name = table.text("name", f"gateway-{index}")
    if not _GATEWAY_NAME_RE.fullmatch(name):
        table.problem("name", f"{_quote(name)} is not a gateway name ([A-Za-z0-9_.-], 1–63 chars)")
    public_key = b""
    encoded = table.optional_text("public_key")
    if encoded is None and "public_key" not in raw:
        table.missing("public_key", "the gateway's base64 public key")
    elif encoded is not None:
        try:
            public_key = keys.decode_key(encoded, what="public key")
        except ValueError as exc:
            table.problem("public_key", str(exc))
    endpoints = []
    for path, text in table.strings("endpoints", 'host:port strings, e.g. ["gw.example:51820"]'):
        try:
            endpoints.append(HostPort.parse(text))
        except ValueError as exc:
            ctx.add(path, f"{_quote(text)} is not host:port ({exc})")
    allowed_ips = _allowed_ips(table)
    keepalive = table.integer("persistent_keepalive", 25, 0, 65535)
    preshared_key = _key_source(table, "preshared_key")
    table.done()
    return GatewayConfig(name, public_key, tuple(endpoints), allowed_ips, keepalive, preshared_key)


def _allowed_ips(table: _Table) -> tuple[IPNetwork, ...]:
    networks = []
    for path, text in table.strings("allowed_ips", 'networks, e.g. ["10.44.0.1/32"]'):
        try:
            network = ipaddress.ip_network(text, strict=False)  # host bits masked, as `wg` does
        except ValueError:
            table.ctx.add(path, f"{_quote(text)} is not an IP network, e.g. 10.44.0.1/32")
            continue
        if network.prefixlen == 0:
            table.ctx.add(
                path,
                f"{_quote(text)} is a default route: tunneld never routes all traffic through "
                "the tunnel; list the gateway's tunnel address, e.g. 10.44.0.1/32",
            )
            continue
        networks.append(network)
    return tuple(networks)


def _check_gateways(ctx: _Context, gateways: tuple[GatewayConfig, ...]) -> None:
    """Rules across gateways: unique names and keys, no address routed to two peers."""
    names: dict[str, int] = {}
    public_keys: dict[bytes, int] = {}
    for index, gateway in enumerate(gateways):
        if gateway.name in names:
            message = f"{_quote(gateway.name)} is taken by gateway[{names[gateway.name]}]"
            ctx.add(("gateway", index, "name"), message)
        names.setdefault(gateway.name, index)
        if gateway.public_key in public_keys:
            other = public_keys[gateway.public_key]
            message = f"same key as gateway[{other}]; each gateway is a distinct peer"
            ctx.add(("gateway", index, "public_key"), message)
        if gateway.public_key:  # b"" = invalid, already reported
            public_keys.setdefault(gateway.public_key, index)
        for other, earlier in enumerate(gateways[:index]):
            for network in gateway.allowed_ips:
                for taken in earlier.allowed_ips:
                    if network.version == taken.version and network.overlaps(taken):
                        ctx.add(
                            ("gateway", index, "allowed_ips"),
                            f"{network} overlaps {taken} of gateway[{other}]; WireGuard routes "
                            "an address to one peer only",
                        )


def _config(ctx: _Context, raw: dict[str, object]) -> Config:
    root = _Table(ctx, (), raw)
    interface = _interface(ctx, root.table("interface"))
    tables = root.tables("gateway")
    gateways = tuple(_gateway(ctx, index, table) for index, table in enumerate(tables))
    if not gateways and isinstance(raw.get("gateway", []), list):
        ctx.add(("gateway",), "missing; at least one [[gateway]] table is required")
    _check_gateways(ctx, gateways)
    root.done()
    return Config(ctx.label, interface, gateways)


# --- file and environment -------------------------------------------------------------------


def _read_file(path: Path, label: str, *, required: bool = True) -> dict[str, object] | None:
    """The parsed file; None if it does not exist and is not ``required``."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        if not required:
            return None
        raise ConfigError(f"{label}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not UTF-8 text (byte {exc.start}); TOML is UTF-8") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: invalid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{label}: invalid TOML: nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{label}: invalid TOML: {exc}") from exc


def _env_target(variable: str) -> tuple[str, int | None, str] | None:
    """``TUNNELD_INTERFACE_MTU`` → ("interface", None, "mtu"); GATEWAY_<N>_ gives an index."""
    rest = variable.removeprefix("TUNNELD_")
    for section in _ENV_TABLES:
        match = re.fullmatch(rf"{section.upper()}_([A-Z][A-Z0-9_]*)", rest)
        if match:
            return section, None, match[1].lower()
    for section in _ENV_ARRAYS:
        match = re.fullmatch(rf"{section.upper()}_(0|[1-9][0-9]*)_([A-Z][A-Z0-9_]*)", rest)
        if match:
            return section, int(match[1]), match[2].lower()
    return None


def _overlay_env(ctx: _Context, raw: dict[str, object], environ: Mapping[str, str]) -> None:
    """Write ``TUNNELD_*`` overrides into ``raw`` as strings; ``_Table`` converts them."""
    indexed: list[tuple[str, int, str, str]] = []
    for variable in sorted(environ):
        if not variable.startswith("TUNNELD_") or variable in RESERVED_ENV:
            continue
        target = _env_target(variable)
        if target is None:
            forms = [f"TUNNELD_{name.upper()}_<KEY>" for name in _ENV_TABLES]
            forms += [f"TUNNELD_{name.upper()}_<N>_<KEY>" for name in _ENV_ARRAYS]
            expected = ", ".join(forms + sorted(RESERVED_ENV))
            ctx.problems.append(f"environment: {variable}: unknown variable; expected {expected}")
            continue
        section, index, key = target
        if index is not None:
            indexed.append((section, index, key, variable))
            continue
        table = raw.setdefault(section, {})
        if isinstance(table, dict):  # else: the type error is reported by _Table
            table[key] = environ[variable]
            ctx.env_origins[(section, key)] = variable
    for section, index, key, variable in sorted(indexed):  # by index, so appends are in order
        tables = raw.setdefault(section, [])
        if not isinstance(tables, list):
            continue
        if index == len(tables):
            tables.append({})
        if index > len(tables):
            ctx.problems.append(
                f"environment: {variable}: index {index} leaves a gap: there is no {section} "
                f"{len(tables)} in the file or environment (indices are 0-based, contiguous)"
            )
        elif isinstance(tables[index], dict):
            tables[index][key] = environ[variable]
            ctx.env_origins[(section, index, key)] = variable


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (else ``$TUNNELD_CONFIG``, else the default file if it exists, else
    nothing) and overlay ``TUNNELD_*`` variables; raise one ``ConfigError`` listing every problem.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, object] | None = None
    if path is None and "TUNNELD_CONFIG" in env:
        if not env["TUNNELD_CONFIG"]:
            raise ConfigError("environment: TUNNELD_CONFIG: empty; expected a file path")
        path = Path(env["TUNNELD_CONFIG"])
        raw = _read_file(path, f"environment: TUNNELD_CONFIG: {path}")
    elif path is not None:
        raw = _read_file(path, str(path))
    else:
        raw = _read_file(DEFAULT_CONFIG_PATH, str(DEFAULT_CONFIG_PATH), required=False)
        path = DEFAULT_CONFIG_PATH if raw is not None else None
    if raw is None or path is None:  # no file at all: the environment alone
        raw, label, key_dir = {}, "environment", Path.cwd()
    else:
        label, key_dir = str(path), path.absolute().parent
    ctx = _Context(label, key_dir, env.get("CREDENTIALS_DIRECTORY") or None)
    _overlay_env(ctx, raw, env)
    config = _config(ctx, raw)
    if ctx.problems:
        raise ConfigError(ctx.problems)
    return config


# --- rendering ------------------------------------------------------------------------------


def _toml_list(items: Iterable[object]) -> str:
    return "[" + ", ".join(_quote(str(item)) for item in items) + "]"


def _render_key_source(prefix: str, source: KeySource) -> list[str]:
    if source.credential is None:
        return [f"{prefix}_file = {_quote(str(source.path))}"]
    return [f"{prefix}_credential = {_quote(source.credential)}  # {_quote(str(source.path))}"]


def render_config(config: Config) -> str:
    """The effective configuration as TOML that ``load_config`` reads back to an equal Config.

    Only key *locations* and public keys appear: config never holds secret key material.
    """
    interface = config.interface
    lines = [
        "# effective configuration (file + environment)",
        f"# source: {_quote(config.source)}",
        "",
        "[interface]",
        f"name = {_quote(interface.name)}",
        *_render_key_source("private_key", interface.private_key),
        f"address = {_toml_list(interface.addresses)}",
    ]
    if interface.listen_port is not None:
        lines.append(f"listen_port = {interface.listen_port}")
    lines += [
        f"fwmark = {interface.fwmark:#x}",
        f"mtu = {interface.mtu}",
        f"backend = {_quote(interface.backend)}",
        f"userspace_binary = {_quote(interface.userspace_binary)}",
    ]
    for gateway in config.gateways:
        lines += [
            "",
            "[[gateway]]",
            f"name = {_quote(gateway.name)}",
            f"public_key = {_quote(base64.b64encode(gateway.public_key).decode())}",
            f"endpoints = {_toml_list(gateway.endpoints)}",
            f"allowed_ips = {_toml_list(gateway.allowed_ips)}",
            f"persistent_keepalive = {gateway.persistent_keepalive_seconds}",
        ]
        if gateway.preshared_key is not None:
            lines += _render_key_source("preshared_key", gateway.preshared_key)
    return "\n".join(lines) + "\n"
