"""``HostPort``: the ``host:port`` syntax that config uses for gateway endpoints and upstreams.

A value here is unresolved: a DNS name (kept as written) or an IP literal (made canonical; IPv6
without its brackets). ``tunnel.py`` resolves it. Both ``config.py``
and ``config_proxy.py`` parse with it, so it lives apart from either.
"""

# ruff: noqa: RUF001 -- messages write ranges with an en dash (U+2013) on purpose

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# Underscores are not legal in host names but resolvers accept them and internal names use them.
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_PORT_RE = re.compile(r"[0-9]{1,5}")


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
