"""Ingress rules: which service a request is for. Pure: no I/O, no trio.

Rules are the ``[[service]]`` entries with ``protocol = "http"``, in config order; the first whose
host pattern and path prefix both match wins. A host pattern is an exact name, ``*.suffix``
(any name ending in ``.suffix``, not the bare suffix itself) or ``*`` (any host, the catch-all).
Host comparison ignores case, a trailing dot and any ``:port``; bracketed IPv6 literals compare
by address. A path prefix matches on segment boundaries (``/v1`` matches ``/v1`` and ``/v1/x``,
not ``/v10``), case-sensitively, and is compared with the path in the canonical form
:mod:`tunneld.proxy.paths` gives it (the request parser puts every target in that form, and the
origin gets that same form): unreserved characters decoded, ``//`` merged, dot segments,
encoded ``/`` and ``\\`` refused. Matching the path as sent would let ``/%61dmin`` past a rule
for ``/admin`` to an origin that decodes it. A path with ``;`` (or ``%3B``) must also match the
same rule with each segment's ``;parameters`` cut off, as Java servlet containers read it; else
it is refused (400).

The syntax of a pattern (:func:`host_pattern`, used by config validation) lives here too, so that
the canonical form config stores and the form :func:`normalize_host` gives a Host header agree;
and so does :func:`unreachable_rules`, with which config refuses rules that could never be chosen.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tunneld.proxy.paths import PathError, without_parameters

if TYPE_CHECKING:  # config_proxy imports this module for its validation
    from tunneld.config_proxy import ServiceConfig

# RFC 9110 / 3986: Host = uri-host [ ":" port ]; port = *DIGIT; reg-name (lower-cased here) =
# *( unreserved / pct-encoded / sub-delims ).
_PORT_RE = re.compile(r"[0-9]*")
_REG_NAME_RE = re.compile(r"[a-z0-9._~!$&'()*+,;=%-]*")
# Underscores are not legal in host names but resolvers accept them and internal names use them.
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def normalize_host(host: str) -> str:
    """``Billing.Internal.:80`` → ``billing.internal``; ``[FD44:0::2]:80`` → ``[fd44::2]``.

    A value that is not ``name[:port]`` or ``[v6][:port]`` gives ``""``, like a missing Host: it
    matches only the catch-all.
    """
    host = host.strip().lower()
    if host.startswith("["):
        address, bracket, rest = host[1:].partition("]")
        if bracket and (not rest or (rest[0] == ":" and _PORT_RE.fullmatch(rest[1:]))):
            try:
                return f"[{ipaddress.IPv6Address(address)}]"
            except ValueError:
                pass
        return ""
    name, colon, port = host.partition(":")
    if not _REG_NAME_RE.fullmatch(name) or (colon and not _PORT_RE.fullmatch(port)):
        return ""
    return name.removesuffix(".")


def host_pattern(text: str) -> str:
    """A ``hosts`` entry in canonical form: lower case, no trailing dot, IPv6 compressed.

    ``*`` (catch-all), ``*.suffix``, a DNS name, an IPv4 address or a bracketed IPv6 address.
    ``ValueError`` says what is wrong.
    """
    if not text:
        raise ValueError("empty")
    if any(char.isspace() or not char.isprintable() for char in text):
        raise ValueError("contains a space or control character")
    if text == "*":
        return text
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if "*" in name:
        raise ValueError('"*" stands alone or as the whole first label, e.g. "*.example.com"')
    if wildcard and not name:
        raise ValueError('a name must follow "*."')
    if ":" in name and not name.startswith("["):
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise ValueError("no :port; the port is ignored when matching") from None
    if name.startswith("[") and "]:" in name:
        raise ValueError("no :port; the port is ignored when matching")
    if wildcard:
        return "*." + host_name(name, ip_literal=False)
    return exact_host(name)


def exact_host(name: str) -> str:
    """A DNS name, IPv4 address or bracketed IPv6 address, canonical; else ``ValueError``."""
    if name.startswith("["):
        if not name.endswith("]"):
            raise ValueError("missing ']' after the IPv6 address")
        try:
            return f"[{ipaddress.IPv6Address(name[1:-1])}]"
        except ValueError:
            raise ValueError("not a valid IPv6 address inside the brackets") from None
    if ":" in name:
        try:
            address = ipaddress.IPv6Address(name)
        except ValueError:
            address = None
        if address is not None:
            raise ValueError(f"an IPv6 address needs brackets, e.g. [{address}]")
        raise ValueError("not a DNS name: letters, digits, '-', '_', dot-separated labels")
    return host_name(name, ip_literal=True)


def host_name(name: str, *, ip_literal: bool) -> str:
    """A DNS name (or, if ``ip_literal``, an IPv4 address), canonical; else ``ValueError``."""
    name = name.lower().removesuffix(".")
    if ip_literal and re.fullmatch(r"[0-9.]+", name):
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            raise ValueError("not a valid IPv4 address") from None
    labels = name.split(".")
    if len(name) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError("not a DNS name: letters, digits, '-', '_', dot-separated labels")
    return name


def host_matches(pattern: str, host: str) -> bool:
    """Whether a normalized ``host`` matches ``pattern`` (see the module docstring)."""
    pattern = pattern.lower()
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def pattern_covers(outer: str, inner: str) -> bool:
    """Whether every host that ``inner`` matches is matched by ``outer`` (canonical patterns)."""
    if outer == "*":
        return True
    if outer.startswith("*."):
        return inner != "*" and inner.removeprefix("*").endswith(outer[1:])
    return inner == outer


def path_matches(prefix: str, path: str) -> bool:
    """Whether ``path`` is ``prefix`` or below it; also tells whether one prefix covers another."""
    if prefix == "/" or path == prefix:
        return True
    return path.startswith(prefix if prefix.endswith("/") else prefix + "/")


def unreachable_rules(services: Sequence[ServiceConfig]) -> dict[int, list[int]]:
    """The http rules no request can reach, each with earlier rules that match all its requests.

    Indices are into ``services``. Rule *j* is unreachable when each of its host patterns is
    covered by a pattern of some earlier rule whose path prefix covers *j*'s (different patterns
    may be covered by different rules); for each pattern, the first such rule is named. Prefixes
    are subtrees, so a union of earlier prefixes covers *j*'s only if one of them does; and a
    wildcard is covered only by a single pattern.

    Linear in the number of rules: instead of comparing each rule with every earlier one, it
    looks up the few (prefix, pattern) pairs that could cover each of its own
    (:func:`_covering_prefixes`, :func:`_covering_patterns`) in a table of the first rule that
    has each pair.
    """
    first_with: dict[tuple[str, str], int] = {}  # (path prefix, host pattern) → first rule
    unreachable: dict[int, list[int]] = {}
    for index, rule in enumerate(services):
        if rule.protocol != "http":
            continue
        prefixes = _covering_prefixes(rule.path_prefix)
        taken_by: set[int] = set()
        for pattern in rule.hosts:
            found = [
                first_with[key]
                for key in itertools.product(prefixes, _covering_patterns(pattern))
                if key in first_with
            ]
            if not found:
                break
            taken_by.add(min(found))
        else:
            if rule.hosts:
                unreachable[index] = sorted(taken_by)
        for pattern in rule.hosts:
            first_with.setdefault((rule.path_prefix, pattern), index)
    return unreachable


def _covering_prefixes(prefix: str) -> list[str]:
    """Every path prefix that covers ``prefix`` (``path_matches(outer, prefix)``): ``/``, itself,
    and each leading part that ends at a ``/`` of it, with and without that ``/``."""
    candidates = {"/", prefix}
    for position, char in enumerate(prefix):
        if char == "/" and position > 0:
            candidates.update((prefix[:position], prefix[: position + 1]))
    return [outer for outer in candidates if path_matches(outer, prefix)]


def _covering_patterns(pattern: str) -> list[str]:
    """Every host pattern that covers ``pattern`` (``pattern_covers(outer, pattern)``): ``*``,
    itself, and ``*`` followed by each of its suffixes that starts with a dot."""
    if pattern == "*":
        return ["*"]
    candidates = {"*", pattern}
    name = pattern.removeprefix("*")
    candidates.update("*" + name[position:] for position, char in enumerate(name) if char == ".")
    return [outer for outer in candidates if pattern_covers(outer, pattern)]


class Router:
    """First-match-wins lookup over the HTTP services."""

    def __init__(self, services: Sequence[ServiceConfig]) -> None:
        #: The rules in match order: the http services as configured.
        self.rules: tuple[ServiceConfig, ...] = tuple(
            service for service in services if service.protocol == "http"
        )
        self._compiled = [
            (service.path_prefix, tuple(pattern.lower() for pattern in service.hosts), service)
            for service in self.rules
        ]

    def match(self, host: str | None, target: str) -> ServiceConfig | None:
        """The service for a request with this Host header and target, or None (→ 404).

        ``target`` is in canonical form (:func:`tunneld.proxy.paths.normalize_target`); its
        query is ignored. Raises :class:`~tunneld.proxy.paths.PathError` (→ 400) for a path
        with ``;`` that a servlet container would route elsewhere (see the module docstring).
        """
        name = normalize_host(host or "")
        end = target.find("?")
        path = (target if end < 0 else target[:end]) or "/"
        service = self._first(name, path)
        if (";" in path or "%3B" in path) and self._first(
            name, without_parameters(path)
        ) is not service:
            raise PathError("a ';' in the request path that changes which service it is for")
        return service

    def _first(self, name: str, path: str) -> ServiceConfig | None:
        for prefix, patterns, service in self._compiled:
            if path_matches(prefix, path) and any(
                host_matches(pattern, name) for pattern in patterns
            ):
                return service
        return None
