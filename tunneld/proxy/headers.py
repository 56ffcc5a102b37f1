"""Header rewriting between client and origin, and the shared-secret check. Pure: no I/O.

Header names arrive lower-cased from :mod:`tunneld.proxy.http1`. What is removed on the way through:
hop-by-hop headers (RFC 9110 §7.6.1: ``Connection`` and every header it names, ``Keep-Alive``,
``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``, any ``Proxy-*``) — except that an
upgrade keeps ``Upgrade`` and says ``Connection: upgrade`` — and ``Expect``, which the proxy
answers itself. ``Connection`` cannot remove the headers that frame or route the message
(``Content-Length``, ``Host``): a client listing them there would otherwise make the origin read
the body differently than we did.

Headers whose names contain ``_`` are dropped, as nginx does by default
(``underscores_in_headers off``): CGI, WSGI, PHP and Rack origins read ``X_Forwarded_For`` and
``X-Forwarded-For`` as the same ``HTTP_X_FORWARDED_FOR``, so such a header could stand in for
one this hop sets or strips, or for one a gateway's authentication sets. All of them go, not only
look-alikes of the ones tunneld knows, because tunneld cannot know which the origin trusts.

Forwarding headers: without ``trust_forwarded_headers`` incoming ``X-Forwarded-*`` and
``Forwarded`` are dropped and replaced with what this hop saw, so a client cannot spoof them;
with it (the gateway is trusted to set them), the client address is appended to
``X-Forwarded-For`` / ``Forwarded`` and existing ``-Proto`` / ``-Host`` are kept.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

from tunneld.config_proxy import ProxyConfig, ServiceConfig
from tunneld.proxy.http1 import RequestHead, ResponseHead, request_head_bytes, response_head_bytes

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
# Never removed because Connection names them: they frame or route the message.
_PROTECTED = frozenset({b"content-length", b"host"})
_FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)
_UNDERSCORE = ord("_")  # an int: ``95 in name`` is much cheaper than ``b"_" in name``
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True, slots=True)
class ForwardingPolicy:
    """How one service's requests are rewritten (built once per service)."""

    trust_forwarded: bool = False
    add_forwarded: bool = False
    host_rewrite: bytes | None = None
    strip_header: bytes | None = None  # the require_header name, unless it is forwarded
    proto: bytes = b"http"  # what the gateway spoke to us: plain HTTP inside the tunnel

    @classmethod
    def for_service(cls, service: ServiceConfig, proxy: ProxyConfig) -> ForwardingPolicy:
        required = service.require_header
        return cls(
            trust_forwarded=proxy.trust_forwarded_headers,
            add_forwarded=proxy.add_forwarded_header,
            host_rewrite=service.host_rewrite.encode("idna") if service.host_rewrite else None,
            strip_header=(
                required.name.lower().encode("ascii") if required and not required.forward else None
            ),
        )


def connection_tokens(headers: Headers) -> set[bytes]:
    """The lower-cased options listed in all ``Connection`` headers."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    tokens.discard(b"")
    return tokens


def _droppable(name: bytes, listed: set[bytes]) -> bool:
    return (
        name in HOP_BY_HOP
        or name.startswith(b"proxy-")
        or (name in listed and name not in _PROTECTED)
    )


def request_headers(
    headers: Headers,
    policy: ForwardingPolicy,
    *,
    client_address: str,
    host: bytes,
    upgrade: bool = False,
) -> Headers:
    """The headers to send to the origin for a request with these ``headers``.

    ``host`` is the authority the request was routed by; ``client_address`` the peer's IP.
    Message framing (``Transfer-Encoding: chunked``) is the caller's to add.
    """
    listed = connection_tokens(headers)
    out: Headers = []
    upgrades: Headers = []
    forwarded_for: list[bytes] = []
    forwarded: list[bytes] = []
    forwarded_proto: bytes | None = None
    forwarded_host: bytes | None = None
    trust = policy.trust_forwarded
    for name, value in headers:
        if name == b"upgrade" and upgrade:
            upgrades.append((name, value))
            continue
        if (
            _droppable(name, listed)
            or name == b"expect"
            or name == policy.strip_header
            or _UNDERSCORE in name
        ):
            continue
        if name in _FORWARDING:
            if trust:
                if name == b"x-forwarded-for":
                    forwarded_for.append(value)
                elif name == b"forwarded":
                    forwarded.append(value)
                elif name == b"x-forwarded-proto":
                    forwarded_proto = forwarded_proto or value
                else:
                    forwarded_host = forwarded_host or value
            continue
        if name == b"host" and policy.host_rewrite is not None:
            value = policy.host_rewrite
        out.append((name, value))
    if upgrades:
        out.append((b"connection", b"upgrade"))
        out.extend(upgrades)
    address = client_address.encode("ascii", "replace")
    forwarded_for.append(address)
    out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    out.append((b"x-forwarded-proto", forwarded_proto or policy.proto))
    out.append((b"x-forwarded-host", forwarded_host or host))
    if policy.add_forwarded:
        forwarded.append(forwarded_element(address, host, policy.proto))
        out.append((b"forwarded", b", ".join(forwarded)))
    elif forwarded:  # trusted and not ours to extend: pass it on unchanged
        out.extend((b"forwarded", value) for value in forwarded)
    return out


def response_headers(headers: Headers, *, upgrade: bool = False) -> Headers:
    """The origin's response headers without hop-by-hop ones (``upgrade``: a 101 to relay)."""
    listed = connection_tokens(headers)
    out: Headers = []
    for name, value in headers:
        if (name == b"upgrade" and upgrade) or not _droppable(name, listed):
            out.append((name, value))
    if upgrade:
        out.append((b"connection", b"upgrade"))
    return out


def origin_request_head(
    head: RequestHead, policy: ForwardingPolicy, *, client_address: str
) -> bytes:
    """The request head to send to the origin: rewritten headers, always HTTP/1.1."""
    headers = request_headers(
        head.headers, policy, client_address=client_address, host=head.host, upgrade=head.upgrade
    )
    if head.framing == "chunked":
        headers.append((b"transfer-encoding", b"chunked"))
    return request_head_bytes(head.method, head.target, headers)


def client_response_head(
    response: ResponseHead, request: RequestHead, *, keep_alive: bool
) -> tuple[bytes, bool, bool]:
    """The origin's response head as the client gets it: ``(bytes, chunked, keep_alive)``.

    A body without length (chunked or up to EOF) is re-chunked for an HTTP/1.1 client; an
    HTTP/1.0 client gets it raw and the connection ends with it. ``chunked`` says whether the
    body must be chunk-encoded; ``keep_alive`` whether the client connection stays open.
    """
    headers = response_headers(response.headers)
    chunked = False
    if response.framing in ("chunked", "close"):
        if request.version == b"1.1":
            chunked = True
            headers.append((b"transfer-encoding", b"chunked"))
        else:
            keep_alive = False
    if not keep_alive:
        headers.append((b"connection", b"close"))
    elif request.version == b"1.0":
        headers.append((b"connection", b"keep-alive"))
    return response_head_bytes(response.status, response.reason, headers), chunked, keep_alive


def forwarded_element(address: bytes, host: bytes, proto: bytes) -> bytes:
    """One RFC 7239 ``Forwarded`` element: ``for=…;host=…;proto=…``."""
    node = b'"[' + address + b']"' if b":" in address else address
    return b"for=%b;host=%b;proto=%b" % (node, _token_or_quoted(host), proto)


def _token_or_quoted(value: bytes) -> bytes:
    if _TOKEN_RE.fullmatch(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def has_required_header(headers: Headers, name: bytes, secret: bytes) -> bool:
    """Whether exactly one ``name`` header carries ``secret`` (constant-time comparison).

    Absent, repeated or wrong all fail alike; nothing here logs or raises with the values.
    """
    presented: bytes | None = None
    count = 0
    for header, value in headers:
        if header == name:
            presented = value
            count += 1
    if presented is None:
        # Compare anyway so a missing header costs what a wrong one does.
        hmac.compare_digest(secret, secret)
        return False
    return hmac.compare_digest(presented.strip(), secret) and count == 1
