"""The ``[proxy]`` table and ``[[service]]`` entries: what tunneld forwards, and how.

Plain frozen data first; below it the validators that build it from TOML. ``config.py`` calls
them; they read through :class:`~tunneld.config_reader.Table` like the rest of the config, so a
bad value becomes one problem naming its key path (or variable) and validation goes on. Only the
rules of these sections live here; typed reads (booleans, seconds, file paths) are ``Table``'s.

Rules spanning entries run last, in ``check_services``: unique names, free TCP ports, and no
unreachable rule (:func:`tunneld.proxy.routes.unreachable_rules` says which those are).

Secrets never pass through here: ``require_header`` names the *file* that holds one, which the
proxy reads. So everything ``render_proxy`` and ``render_service`` print is safe to show.
"""

# ruff: noqa: RUF001 -- messages write ranges with an en dash (U+2013) on purpose

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast, get_args

from tunneld.config_reader import Context, KeyPath, Table, dotted, shown, toml_lines
from tunneld.host_port import HostPort
from tunneld.proxy.paths import prefix_problem
from tunneld.proxy.routes import exact_host, host_name, host_pattern, unreachable_rules
from tunneld.wireguard.model import IPNetwork

Protocol = Literal["http", "tcp"]
UpstreamScheme = Literal["http", "https", "tcp", "unix"]


@dataclass(frozen=True)
class Upstream:
    """A service's origin: ``http://host:port``, ``https://…``, ``tcp://…`` or ``unix:/path``."""

    scheme: UpstreamScheme
    host: str = ""  # DNS name or IP literal (IPv6 without brackets); "" for unix
    port: int = 0  # 0 for unix
    path: Path | None = None  # the socket, for unix

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class RequireHeader:
    """A shared secret the gateway must present in a request header."""

    name: str  # lower-case header name
    value_file: Path  # the secret lives in a 0600 file, never in the config
    forward: bool = False  # pass the header on to the origin (default: strip it)


@dataclass(frozen=True)
class TLSOptions:
    """How to talk TLS to an ``https://`` origin."""

    ca_file: Path | None = None  # None: the system's CAs
    client_cert_file: Path | None = None  # mTLS to the origin
    client_key_file: Path | None = None
    server_name: str | None = None  # SNI and the name verified; default: the upstream host
    verify: bool = True


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    upstream: Upstream
    protocol: Protocol = "http"
    # http: exact names or "*.suffix" wildcards, case-insensitive; "*" alone is the catch-all.
    hosts: tuple[str, ...] = ()
    path_prefix: str = "/"  # http: must start with "/"
    listen_port: int | None = None  # tcp: required; the port on the tunnel address
    host_rewrite: str | None = None  # http: Host sent to the origin (default: unchanged)
    require_header: RequireHeader | None = None
    tls: TLSOptions = field(default_factory=TLSOptions)
    connect_timeout_seconds: float = 5.0
    response_timeout_seconds: float = 60.0  # http: time from request sent to response head
    idle_timeout_seconds: float = 300.0  # no bytes either way for this long closes the connection
    max_idle_upstream_connections: int = 16  # http: keep-alive pool bound per service


@dataclass(frozen=True)
class ProxyConfig:
    http_port: int = 80  # HTTP services share this port on the tunnel address(es)
    # Concurrent client connections; HTTP excess gets 503. None: "auto", derived from the open
    # files limit at run time (tunneld.fdlimit), which also lowers a number too high for it.
    max_connections: int | None = None
    max_request_head_bytes: int = 65536  # request line + headers; beyond → 431
    request_head_timeout_seconds: float = 10.0  # a slower client head → 408
    # Sources allowed to connect, narrowing the gateways' allowed_ips; empty = all of those.
    allowed_sources: tuple[IPNetwork, ...] = ()
    trust_forwarded_headers: bool = False  # keep X-Forwarded-* from the gateway and append to them
    add_forwarded_header: bool = False  # also set RFC 7239 Forwarded
    shutdown_grace_seconds: float = 30.0  # on SIGTERM, in-flight requests get this long
    access_log: bool = False  # one info line per request (off: a busy gateway floods the log)


# --- limits and vocabulary ------------------------------------------------------------------

MAX_CONNECTIONS = 1 << 20
REQUEST_HEAD_BYTES_MIN, REQUEST_HEAD_BYTES_MAX = 1024, 1 << 20
MAX_IDLE_UPSTREAM_CONNECTIONS = 1024
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
UNIX_PATH_MAX_BYTES = 107

_SERVICE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")  # a metrics label too
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
# RFC 3986 path characters: unreserved, pct-encoded, sub-delims, ":", "@" — and "/".
_URL_PATH_RE = re.compile(r"/[A-Za-z0-9\-._~%!$&'()*+,;=:@/]*")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_INTEGER_RE = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")  # as config_reader reads variables

_HTTP_ONLY = ("hosts", "path_prefix", "host_rewrite", "response_timeout",
              "max_idle_upstream_connections", "require_header", "tls")  # fmt: skip
_TCP_ONLY = ("listen_port",)
_ALL_UPSTREAM_FORMS = "http://host:port, https://host:port, tcp://host:port or unix:/path"
_UPSTREAM_FORMS = {
    "http": "http://host:port, https://host:port or unix:/path",
    "tcp": "tcp://host:port or unix:/path",
}
_UPSTREAM_SCHEMES = {"http": ("http", "https"), "tcp": ("tcp",)}
_A_SERVICE = {"http": "an http service", "tcp": "a tcp service"}
# Headers the proxy itself reads, sets or removes (and Proxy-*, which it removes): a shared
# secret in one of them cannot work.
_PROXY_HEADERS = frozenset({
    "host", "connection", "keep-alive", "te", "trailer", "transfer-encoding",
    "upgrade", "expect", "content-length", "forwarded", "x-forwarded-for", "x-forwarded-host",
    "x-forwarded-proto",
})  # fmt: skip

_SERVICE_DEFAULTS = ServiceConfig(name="", upstream=Upstream("unix"))
_PROXY_DEFAULTS = ProxyConfig()


# --- [proxy] --------------------------------------------------------------------------------


def read_proxy(
    ctx: Context, raw: dict[str, object], gateway_networks: Sequence[IPNetwork]
) -> ProxyConfig:
    """``[proxy]``; ``gateway_networks`` are all gateways' ``allowed_ips``."""
    table = Table(ctx, ("proxy",), raw)
    defaults = _PROXY_DEFAULTS
    proxy = ProxyConfig(
        http_port=table.integer("http_port", defaults.http_port, 1, 65535),
        max_connections=_max_connections(table),
        max_request_head_bytes=table.integer(
            "max_request_head_bytes",
            defaults.max_request_head_bytes,
            REQUEST_HEAD_BYTES_MIN,
            REQUEST_HEAD_BYTES_MAX,
        ),
        request_head_timeout_seconds=table.seconds(
            "request_head_timeout", defaults.request_head_timeout_seconds
        ),
        allowed_sources=_allowed_sources(table, gateway_networks),
        trust_forwarded_headers=table.boolean("trust_forwarded_headers", False),
        add_forwarded_header=table.boolean("add_forwarded_header", False),
        shutdown_grace_seconds=table.seconds("shutdown_grace", defaults.shutdown_grace_seconds),
        access_log=table.boolean("access_log", False),
    )
    table.done()
    return proxy


def _max_connections(table: Table) -> int | None:
    """``max_connections``: ``"auto"`` (also the default) is None, else an integer in range."""
    value = table.raw.get("max_connections")
    from_env = (*table.path, "max_connections") in table.ctx.env_origins
    if isinstance(value, str) and not (from_env and _INTEGER_RE.fullmatch(value.strip())):
        table.known.append("max_connections")
        if value.strip() != "auto":
            table.problem("max_connections", f'{shown(value)}: expected "auto" or an integer')
        return None
    return table.optional_integer("max_connections", 1, MAX_CONNECTIONS)


def _allowed_sources(table: Table, gateway_networks: Sequence[IPNetwork]) -> tuple[IPNetwork, ...]:
    if "allowed_sources" not in table.raw:  # absent: every gateway's allowed_ips
        table.known.append("allowed_sources")
        return ()
    sources = []
    inside = ", ".join(str(network) for network in gateway_networks) or "none"
    for path, text in table.strings("allowed_sources", 'networks, e.g. ["10.44.0.1/32"]'):
        try:
            network = ipaddress.ip_network(text, strict=False)  # host bits masked, as allowed_ips
        except ValueError:
            table.ctx.add(path, f"{shown(text)} is not an IP network, e.g. 10.44.0.1/32")
            continue
        if not any(_subnet_of(network, gateway) for gateway in gateway_networks):
            table.ctx.add(
                path,
                f"{network} is not inside any gateway's allowed_ips ({inside}); "
                "only gateway peers can connect through the tunnel",
            )
            continue
        sources.append(network)
    return tuple(sources)


def _subnet_of(network: IPNetwork, outer: IPNetwork) -> bool:
    if isinstance(network, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return network.subnet_of(outer)
    if isinstance(network, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return network.subnet_of(outer)
    return False


# --- [[service]] ----------------------------------------------------------------------------


def read_service(
    ctx: Context, relative_to: Path | None, index: int, raw: dict[str, object]
) -> ServiceConfig:
    """``service[index]``; relative file paths are resolved against ``relative_to``."""
    table = Table(ctx, ("service", index), raw)
    name = table.required_text("name", 'a unique service name, e.g. "billing"')
    if name is None:
        name = ""
    elif not _SERVICE_NAME_RE.fullmatch(name):
        table.problem("name", f"{shown(name)} is not a service name ([A-Za-z0-9_.-], 1–63 chars)")
    protocol_text = table.text("protocol", "http")
    protocol: Protocol | None = None  # None: invalid, so every key is read and none is refused
    if protocol_text in get_args(Protocol):
        protocol = cast(Protocol, protocol_text)
    else:
        table.problem("protocol", f'{shown(protocol_text)} is not one of "http", "tcp"')
    if protocol == "tcp":
        table.refuse(_HTTP_ONLY, 'not allowed with protocol = "tcp"; it is an http setting')
    elif protocol == "http":
        message = (
            'not allowed with protocol = "http"; http services share proxy.http_port '
            "(listen_port is for tcp services)"
        )
        table.refuse(_TCP_ONLY, message)
    http, tcp = protocol != "tcp", protocol != "http"
    defaults = _SERVICE_DEFAULTS
    hosts = _hosts(table, required=protocol == "http") if http else ()
    path_prefix = _path_prefix(table) if http else defaults.path_prefix
    upstream = _upstream(table, protocol)
    host_rewrite = _host_rewrite(table) if http else None
    connect_timeout = table.seconds("connect_timeout", defaults.connect_timeout_seconds)
    response_timeout = defaults.response_timeout_seconds
    if http:
        response_timeout = table.seconds("response_timeout", response_timeout)
    idle_timeout = table.seconds("idle_timeout", defaults.idle_timeout_seconds)
    max_idle = defaults.max_idle_upstream_connections
    if http:
        max_idle = table.integer(
            "max_idle_upstream_connections", max_idle, 0, MAX_IDLE_UPSTREAM_CONNECTIONS
        )
    listen_port = _listen_port(table, required=protocol == "tcp") if tcp else None
    require_header = _require_header(table, relative_to) if http else None
    tls = _tls(table, relative_to, upstream) if http else defaults.tls
    table.done()
    return ServiceConfig(
        name=name,
        upstream=upstream or defaults.upstream,
        protocol=protocol or "http",
        hosts=hosts,
        path_prefix=path_prefix,
        listen_port=listen_port,
        host_rewrite=host_rewrite,
        require_header=require_header,
        tls=tls,
        connect_timeout_seconds=connect_timeout,
        response_timeout_seconds=response_timeout,
        idle_timeout_seconds=idle_timeout,
        max_idle_upstream_connections=max_idle,
    )


def _hosts(table: Table, *, required: bool) -> tuple[str, ...]:
    if "hosts" not in table.raw and not required:
        table.known.append("hosts")
        return ()
    patterns: list[str] = []
    seen: dict[str, KeyPath] = {}
    expected = 'host names, e.g. ["billing", "*.billing.internal"]'
    for path, text in table.strings("hosts", expected):
        try:
            pattern = host_pattern(text)
        except ValueError as exc:
            table.ctx.add(path, f"{shown(text)} is not a host pattern ({exc})")
            continue
        if pattern in seen:
            table.ctx.add(path, f"{shown(text)} repeats {dotted(seen[pattern])}")
            continue
        seen[pattern] = path
        patterns.append(pattern)
    return tuple(patterns)


def _path_prefix(table: Table) -> str:
    prefix = table.text("path_prefix", _SERVICE_DEFAULTS.path_prefix)
    if not prefix.startswith("/"):
        table.problem("path_prefix", f'{shown(prefix)} does not start with "/"; e.g. "/v1"')
    elif not _URL_PATH_RE.fullmatch(prefix):
        table.problem(
            "path_prefix",
            f"{shown(prefix)} is not a URL path: percent-encode spaces and non-ASCII "
            'characters; no "?" or "#"',
        )
    elif any(segment in (".", "..") for segment in prefix.split("/")):
        table.problem("path_prefix", f'{shown(prefix)} has a "." or ".." segment')
    elif (problem := prefix_problem(prefix)) is not None:
        table.problem("path_prefix", f"{shown(prefix)}: {problem}")
    else:
        return prefix
    return _SERVICE_DEFAULTS.path_prefix


def _upstream(table: Table, protocol: Protocol | None) -> Upstream | None:
    forms = _ALL_UPSTREAM_FORMS if protocol is None else _UPSTREAM_FORMS[protocol]
    text = table.required_text("upstream", forms)
    if text is None:
        return None
    try:
        return parse_upstream(text, protocol)
    except ValueError as exc:
        table.problem("upstream", str(exc))
        return None


def parse_upstream(text: str, protocol: Protocol | None = None) -> Upstream:
    """``text`` as the upstream of a ``protocol`` service (None: of any); ``ValueError`` else."""

    def invalid(reason: str) -> ValueError:
        return ValueError(f"{shown(text)} is not a valid upstream ({reason})")

    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path:
            raise invalid("unix: needs a socket path, e.g. unix:/run/app.sock")
        if path.startswith("//"):
            raise invalid("write unix:/path with one slash; a unix: upstream has no host")
        if not path.startswith("/"):
            raise invalid("the socket path must be absolute, e.g. unix:/run/app.sock")
        if "\0" in path:
            raise invalid("the path contains a NUL character")
        size = len(os.fsencode(path))
        if size > UNIX_PATH_MAX_BYTES:
            raise invalid(f"the socket path is {size} bytes; Linux allows {UNIX_PATH_MAX_BYTES}")
        return Upstream("unix", path=Path(path))
    scheme, separator, rest = text.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in ("http", "https", "tcp"):
        raise invalid(_ALL_UPSTREAM_FORMS)
    if protocol is not None and scheme not in _UPSTREAM_SCHEMES[protocol]:
        raise ValueError(
            f"{shown(text)} is not an upstream for {_A_SERVICE[protocol]} "
            f"({_UPSTREAM_FORMS[protocol]})"
        )
    end = min((i for i in map(rest.find, "/?#") if i != -1), default=len(rest))
    if rest[end:]:
        raise invalid(
            "nothing may follow host:port"
            + ("" if scheme == "tcp" else "; each request keeps its own path")
        )
    try:
        endpoint = HostPort.parse(rest)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    return Upstream(cast(UpstreamScheme, scheme), endpoint.host, endpoint.port)


def _host_rewrite(table: Table) -> str | None:
    """``host[:port]`` as sent in the Host header; kept as written."""
    text = table.optional_text("host_rewrite")
    if text is None:
        return None
    host, port = text, None
    if text.startswith("[") and "]:" in text:
        host, _, port = text.rpartition(":")
    elif not text.startswith("[") and text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        exact_host(host)
    except ValueError as exc:
        table.problem("host_rewrite", f"{shown(text)} is not host or host:port ({exc})")
        return None
    if port is not None and not (_PORT_RE.fullmatch(port) and 1 <= int(port) <= 65535):
        table.problem("host_rewrite", f"{shown(text)} is not host or host:port (port 1–65535)")
        return None
    return text


def _listen_port(table: Table, *, required: bool) -> int | None:
    port = table.optional_integer("listen_port", 1, 65535)
    if port is None and required and "listen_port" not in table.raw:
        table.missing("listen_port", "the port to listen on at the tunnel address, e.g. 5432")
    return port


def _require_header(table: Table, relative_to: Path | None) -> RequireHeader | None:
    sub = table.sub_table("require_header")
    if sub is None:
        return None
    name = _header_name(sub)
    value_file = sub.optional_file("value_file", relative_to)
    if value_file is None and "value_file" not in sub.raw:
        sub.missing("value_file", "the file that holds the secret (mode 0600)")
    forward = sub.boolean("forward", False)
    sub.done()
    if name is None or value_file is None:
        return None
    return RequireHeader(name, value_file, forward)


def _header_name(table: Table) -> str | None:
    """``name``, lower-cased; not a header that the proxy itself uses."""
    name = table.required_text("name", 'a header name, e.g. "X-Backend-Secret"')
    if name is None:
        return None
    if not _HEADER_NAME_RE.fullmatch(name):
        message = f"{shown(name)} is not a header name (letters, digits, !#$%&'*+-.^_`|~)"
        table.problem("name", message)
        return None
    if "_" in name:
        # Headers with "_" are dropped before the origin (see tunneld.proxy.headers).
        table.problem("name", f"{shown(name)}: names with '_' are not forwarded; use '-'")
        return None
    if name.lower() in _PROXY_HEADERS or name.lower().startswith("proxy-"):
        table.problem(
            "name",
            f"{shown(name)} is a header the proxy itself reads or sets; "
            'use one of your own, e.g. "X-Backend-Secret"',
        )
        return None
    return name.lower()


def _tls(table: Table, relative_to: Path | None, upstream: Upstream | None) -> TLSOptions:
    if "tls" in table.raw and upstream is not None and upstream.scheme != "https":
        table.known.append("tls")
        table.problem("tls", f"only for https:// upstreams; upstream is {shown(str(upstream))}")
        return TLSOptions()
    sub = table.sub_table("tls")
    if sub is None:
        return TLSOptions()
    ca_file = sub.optional_file("ca_file", relative_to)
    client_cert_file = sub.optional_file("client_cert_file", relative_to)
    client_key_file = sub.optional_file("client_key_file", relative_to)
    server_name = sub.optional_text("server_name")
    if server_name is not None:
        try:
            server_name = str(ipaddress.ip_address(server_name))
        except ValueError:
            try:
                server_name = host_name(server_name, ip_literal=True)
            except ValueError as exc:
                sub.problem("server_name", f"{shown(server_name)} is not a server name ({exc})")
                server_name = None
    verify = sub.boolean("verify", True)
    if "client_key_file" in sub.raw and "client_cert_file" not in sub.raw:
        sub.problem(
            "client_key_file", "client_cert_file is not set; a client key needs its certificate"
        )
    if "ca_file" in sub.raw and not verify:
        sub.problem("ca_file", "has no effect with verify = false; remove one of them")
    sub.done()
    return TLSOptions(ca_file, client_cert_file, client_key_file, server_name, verify)


# --- rules across services ------------------------------------------------------------------


def check_services(ctx: Context, proxy: ProxyConfig, services: Sequence[ServiceConfig]) -> None:
    """Unique names, a free port for each tcp service, no unreachable http rule."""
    first_with_name: dict[str, int] = {}
    first_with_port: dict[int, int] = {}
    any_http = any(service.protocol == "http" for service in services)
    for index, service in enumerate(services):
        if service.name in first_with_name:
            message = f"{shown(service.name)} is taken by service[{first_with_name[service.name]}]"
            ctx.add(("service", index, "name"), message)
        elif service.name:  # "": missing, reported already
            first_with_name[service.name] = index
        port = service.listen_port
        if service.protocol != "tcp" or port is None:
            continue
        if any_http and port == proxy.http_port:
            ctx.add(
                ("service", index, "listen_port"),
                f"{port} is proxy.http_port, where the http services listen; "
                "choose another port (or change proxy.http_port)",
            )
        elif port in first_with_port:
            ctx.add(
                ("service", index, "listen_port"),
                f"{port} is taken by service[{first_with_port[port]}]",
            )
        else:
            first_with_port[port] = index
    _check_reachable(ctx, services)


def _check_reachable(ctx: Context, services: Sequence[ServiceConfig]) -> None:
    for index, earlier in unreachable_rules(services).items():
        names = " and ".join(f"service[{i}] ({shown(services[i].name)})" for i in earlier)
        if len(earlier) == 1:
            message = f"{names} comes first and matches every request this rule matches"
        else:
            message = f"{names} come first and between them match every request this rule matches"
        ctx.add(("service", index), f"unreachable: {message}")


# --- rendering ------------------------------------------------------------------------------


def render_proxy(proxy: ProxyConfig) -> list[str]:
    """``[proxy]`` as TOML lines (after a blank line)."""
    return [
        "",
        "[proxy]",
        *toml_lines(
            http_port=proxy.http_port,
            max_connections="auto" if proxy.max_connections is None else proxy.max_connections,
            max_request_head_bytes=proxy.max_request_head_bytes,
            request_head_timeout=proxy.request_head_timeout_seconds,
            allowed_sources=proxy.allowed_sources or None,
            trust_forwarded_headers=proxy.trust_forwarded_headers,
            add_forwarded_header=proxy.add_forwarded_header,
            shutdown_grace=proxy.shutdown_grace_seconds,
            access_log=proxy.access_log,
        ),
    ]


def render_service(service: ServiceConfig) -> list[str]:
    """One ``[[service]]`` as TOML lines (after a blank line); a secret only by its file."""
    http = service.protocol == "http"

    def http_only(value: object) -> object:
        return value if http else None

    lines = [
        "",
        "[[service]]",
        *toml_lines(
            name=service.name,
            protocol=service.protocol,
            hosts=http_only(service.hosts),
            path_prefix=http_only(service.path_prefix),
            upstream=service.upstream,
            listen_port=None if http else service.listen_port,
            host_rewrite=http_only(service.host_rewrite),
            connect_timeout=service.connect_timeout_seconds,
            response_timeout=http_only(service.response_timeout_seconds),
            idle_timeout=service.idle_timeout_seconds,
            max_idle_upstream_connections=http_only(service.max_idle_upstream_connections),
        ),
    ]
    if (header := service.require_header) is not None:
        lines.append("[service.require_header]")
        lines += toml_lines(name=header.name, value_file=header.value_file, forward=header.forward)
    if service.upstream.scheme == "https":
        tls = service.tls
        lines.append("[service.tls]")
        lines += toml_lines(
            ca_file=tls.ca_file,
            client_cert_file=tls.client_cert_file,
            client_key_file=tls.client_key_file,
            server_name=tls.server_name,
            verify=tls.verify,
        )
    return lines
