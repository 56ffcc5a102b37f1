"""The ``[proxy]`` table and ``[[service]]`` entries: what tunneld forwards, and how.

Plain frozen data; the validators that build it from TOML live below the dataclasses and read
through :mod:`tunneld.config_reader` like the rest of the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
    max_connections: int = 1024  # concurrent client connections; HTTP excess gets 503
    max_request_head_bytes: int = 65536  # request line + headers; beyond → 431
    request_head_timeout_seconds: float = 10.0  # a slower client head → 408
    # Sources allowed to connect, narrowing the gateways' allowed_ips; empty = all of those.
    allowed_sources: tuple[IPNetwork, ...] = ()
    trust_forwarded_headers: bool = False  # keep X-Forwarded-* from the gateway and append to them
    add_forwarded_header: bool = False  # also set RFC 7239 Forwarded
