"""Ingress rules: which service a request is for. Pure: no I/O, no trio.

Rules are the ``[[service]]`` entries with ``protocol = "http"``, in config order; the first whose
host pattern and path prefix both match wins. A host pattern is an exact name, ``*.suffix``
(any name ending in ``.suffix``, not the bare suffix itself) or ``*`` (any host, the catch-all).
Host comparison ignores case and any ``:port``; a path prefix matches on segment boundaries
(``/v1`` matches ``/v1`` and ``/v1/x``, not ``/v10``).
"""

from __future__ import annotations

from collections.abc import Sequence

from tunneld.config_proxy import ServiceConfig


def normalize_host(host: str) -> str:
    """``Billing.Internal:80`` → ``billing.internal``; IPv6 literals keep their brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    name, _, _port = host.partition(":")
    return name.rstrip(".")


def host_matches(pattern: str, host: str) -> bool:
    pattern = pattern.lower()
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def path_matches(prefix: str, path: str) -> bool:
    if prefix == "/" or path == prefix:
        return True
    return path.startswith(prefix if prefix.endswith("/") else prefix + "/")


class Router:
    """First-match-wins lookup over the HTTP services."""

    def __init__(self, services: Sequence[ServiceConfig]) -> None:
        self._rules = [service for service in services if service.protocol == "http"]

    def match(self, host: str | None, path: str) -> ServiceConfig | None:
        """The service for a request with this Host header and path, or None (→ 404)."""
        name = normalize_host(host or "")
        path = path.split("?", 1)[0] or "/"
        for service in self._rules:
            if path_matches(service.path_prefix, path) and any(
                host_matches(pattern, name) for pattern in service.hosts
            ):
                return service
        return None
