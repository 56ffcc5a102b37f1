"""Header rewriting and the shared-secret check (pure)."""

from __future__ import annotations

from tunneld.proxy.headers import (
    ForwardingPolicy,
    connection_tokens,
    forwarded_element,
    has_required_header,
    request_headers,
    response_headers,
)

ADDRESS = "10.44.0.1"


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name for name, _ in headers]


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def forward(headers: list[tuple[bytes, bytes]], **policy: object) -> list[tuple[bytes, bytes]]:
    upgrade = bool(policy.pop("upgrade", False))
    address = str(policy.pop("address", ADDRESS))
    return request_headers(
        headers,
        ForwardingPolicy(**policy),  # type: ignore[arg-type]
        client_address=address,
        host=b"billing",
        upgrade=upgrade,
    )


def test_hop_by_hop_and_connection_named_headers_are_removed() -> None:
    out = forward(
        [
            (b"host", b"billing"),
            (b"connection", b"keep-alive, X-Secret-Hop"),
            (b"keep-alive", b"timeout=5"),
            (b"x-secret-hop", b"1"),
            (b"te", b"trailers"),
            (b"trailer", b"x"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"websocket"),
            (b"proxy-authorization", b"Basic x"),
            (b"proxy-connection", b"keep-alive"),
            (b"expect", b"100-continue"),
            (b"accept", b"*/*"),
        ]
    )
    assert names(out)[:2] == [b"host", b"accept"]
    for gone in (b"connection", b"keep-alive", b"x-secret-hop", b"te", b"trailer", b"upgrade"):
        assert gone not in names(out)
    assert b"transfer-encoding" not in names(out)
    assert not [n for n in names(out) if n.startswith(b"proxy-")]
    assert b"expect" not in names(out)


def test_connection_cannot_remove_framing_or_host() -> None:
    out = forward(
        [
            (b"host", b"billing"),
            (b"content-length", b"5"),
            (b"connection", b"content-length, host"),
        ]
    )
    assert values(out, b"content-length") == [b"5"]
    assert values(out, b"host") == [b"billing"]


def test_upgrade_keeps_upgrade_and_says_connection_upgrade() -> None:
    out = forward(
        [
            (b"host", b"billing"),
            (b"connection", b"Upgrade"),
            (b"upgrade", b"websocket"),
            (b"sec-websocket-key", b"k"),
        ],
        upgrade=True,
    )
    assert values(out, b"upgrade") == [b"websocket"]
    assert values(out, b"connection") == [b"upgrade"]
    assert values(out, b"sec-websocket-key") == [b"k"]


def test_untrusted_forwarding_headers_are_replaced() -> None:
    out = forward(
        [
            (b"host", b"billing"),
            (b"x-forwarded-for", b"6.6.6.6"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"evil"),
            (b"forwarded", b"for=6.6.6.6"),
        ]
    )
    assert values(out, b"x-forwarded-for") == [ADDRESS.encode()]
    assert values(out, b"x-forwarded-proto") == [b"http"]
    assert values(out, b"x-forwarded-host") == [b"billing"]
    assert values(out, b"forwarded") == []


def test_trusted_forwarding_headers_are_extended() -> None:
    out = forward(
        [
            (b"host", b"billing"),
            (b"x-forwarded-for", b"203.0.113.9"),
            (b"x-forwarded-for", b"198.51.100.2"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"api.example.com"),
            (b"forwarded", b"for=203.0.113.9;proto=https"),
        ],
        trust_forwarded=True,
        add_forwarded=True,
    )
    assert values(out, b"x-forwarded-for") == [b"203.0.113.9, 198.51.100.2, 10.44.0.1"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"api.example.com"]
    assert values(out, b"forwarded") == [
        b"for=203.0.113.9;proto=https, for=10.44.0.1;host=billing;proto=http"
    ]


def test_trusted_forwarded_passes_unchanged_when_not_adding() -> None:
    out = forward([(b"forwarded", b"for=1.2.3.4")], trust_forwarded=True)
    assert values(out, b"forwarded") == [b"for=1.2.3.4"]


def test_forwarded_element_quotes_ipv6_and_ports() -> None:
    assert forwarded_element(b"fd44::1", b"billing:8080", b"http") == (
        b'for="[fd44::1]";host="billing:8080";proto=http'
    )
    out = forward([(b"host", b"b")], add_forwarded=True, address="fd44::1")
    assert values(out, b"forwarded") == [b'for="[fd44::1]";host=billing;proto=http']


def test_host_rewrite_keeps_the_original_in_x_forwarded_host() -> None:
    out = forward([(b"host", b"billing")], host_rewrite=b"localhost:8080")
    assert values(out, b"host") == [b"localhost:8080"]
    assert values(out, b"x-forwarded-host") == [b"billing"]


def test_secret_header_is_stripped_unless_forwarded() -> None:
    headers = [(b"host", b"billing"), (b"backend-secret", b"s3cret")]
    assert values(forward(headers, strip_header=b"backend-secret"), b"backend-secret") == []
    assert values(forward(headers), b"backend-secret") == [b"s3cret"]


def test_response_headers() -> None:
    headers = [
        (b"content-length", b"3"),
        (b"connection", b"close, x-internal"),
        (b"x-internal", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"set-cookie", b"a=b"),
        (b"upgrade", b"websocket"),
    ]
    assert response_headers(headers) == [(b"content-length", b"3"), (b"set-cookie", b"a=b")]
    upgraded = response_headers(headers, upgrade=True)
    assert values(upgraded, b"upgrade") == [b"websocket"]
    assert values(upgraded, b"connection") == [b"upgrade"]


def test_connection_tokens() -> None:
    assert connection_tokens([(b"connection", b"Keep-Alive, ,Upgrade"), (b"x", b"y")]) == {
        b"keep-alive",
        b"upgrade",
    }


def test_required_header() -> None:
    secret = b"s3cret-value"
    name = b"backend-secret"
    assert has_required_header([(name, secret)], name, secret)
    assert has_required_header([(name, b" " + secret + b" ")], name, secret)
    assert not has_required_header([], name, secret)
    assert not has_required_header([(name, b"wrong")], name, secret)
    assert not has_required_header([(name, secret[:-1])], name, secret)
    assert not has_required_header([(name, secret), (name, secret)], name, secret)
    assert not has_required_header([(b"other", secret)], name, secret)


def test_headers_with_underscores_are_dropped_like_nginx_does() -> None:
    """CGI/WSGI read ``X_Forwarded_For`` as ``X-Forwarded-For``: no spoofing by spelling."""
    out = forward(
        [
            (b"host", b"billing"),
            (b"x_forwarded_for", b"6.6.6.6"),
            (b"x_forwarded_proto", b"https"),
            (b"forwarded_", b"for=6.6.6.6"),
            (b"x_backend_secret", b"guess"),
            (b"transfer_encoding", b"chunked"),
            (b"x_custom", b"1"),
            (b"x-custom", b"2"),
        ],
        strip_header=b"x-backend-secret",
    )
    assert not [name for name in names(out) if b"_" in name]
    assert values(out, b"x-forwarded-for") == [ADDRESS.encode()]
    assert values(out, b"x-forwarded-proto") == [b"http"]
    assert values(out, b"x-custom") == [b"2"]
    assert b"6.6.6.6" not in b"".join(value for _, value in out)


def test_underscore_headers_are_dropped_even_when_forwarded_headers_are_trusted() -> None:
    out = forward(
        [(b"host", b"billing"), (b"x_forwarded_for", b"6.6.6.6"), (b"x-forwarded-for", b"1.2.3.4")],
        trust_forwarded=True,
    )
    assert values(out, b"x-forwarded-for") == [b"1.2.3.4, " + ADDRESS.encode()]
