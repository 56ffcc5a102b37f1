# ruff: noqa: RUF001 -- expected messages write ranges with an en dash (U+2013)
"""Tests of ``[proxy]`` and ``[[service]]`` validation (tunneld.config_proxy via load_config).

Like test_config: each test runs in its own directory with an explicit ``environ``, so messages
carry the label "tunneld.toml" as a user would type it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld import config
from tunneld.config import load_config, render_config
from tunneld.config_proxy import (
    ProxyConfig,
    RequireHeader,
    ServiceConfig,
    TLSOptions,
    Upstream,
    parse_upstream,
)
from tunneld.errors import ConfigError

KEY = base64.b64encode(bytes(range(32))).decode()
DELETE = object()  # in a change dict: remove the key
BASE = f"""\
[interface]
address = ["10.44.0.2/24"]

[[gateway]]
public_key = "{KEY}"
endpoints = ["gw.example:51820"]
allowed_ips = ["10.44.0.1/32", "fd44::1/128"]
"""
HTTP: dict[str, Any] = {
    "name": "billing",
    "hosts": ["billing"],
    "upstream": "http://127.0.0.1:8080",
}
TCP: dict[str, Any] = {
    "name": "pg",
    "protocol": "tcp",
    "listen_port": 5432,
    "upstream": "tcp://127.0.0.1:5432",
}
FUZZ_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "tunneld.toml")
    return tmp_path


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):  # JSON escapes are valid TOML; TOML also wants DEL escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def changed(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **changes}
    return {key: value for key, value in merged.items() if value is not DELETE}


def write(
    services: list[dict[str, Any]] | None = None,
    proxy: dict[str, Any] | None = None,
    name: str = "tunneld.toml",
) -> Path:
    text = BASE
    if proxy is not None:
        text += "\n[proxy]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in proxy.items())
    for service in services or []:
        text += "\n[[service]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in service.items())
    path = Path(name)
    path.write_text(text)
    return path


def problems(path: Path | None = None, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={} if environ is None else environ)
    return info.value.problems


def round_trips(path: Path | None = None, environ: dict[str, str] | None = None) -> config.Config:
    loaded = load_config(path, environ={} if environ is None else environ)
    Path("rendered.toml").write_text(render_config(loaded))
    reread = load_config(Path("rendered.toml"), environ={})
    assert reread == dataclasses.replace(loaded, source="rendered.toml")
    return loaded


# --- valid configurations -----------------------------------------------------------------


def test_full_valid_config(isolated: Path) -> None:
    path = Path("tunneld.toml")
    path.write_text(
        BASE
        + """
[proxy]
http_port = 8080
max_connections = 64
max_request_head_bytes = 16384
request_head_timeout = 2.5
allowed_sources = ["10.44.0.1", "fd44::1/128"]
trust_forwarded_headers = true
add_forwarded_header = true
shutdown_grace = 7.5

[[service]]
name = "billing"
protocol = "http"
hosts = ["Billing", "*.Billing.Internal.", "[FD44:0::2]", "10.44.0.2"]
path_prefix = "/v1"
upstream = "https://[::1]:8443"
host_rewrite = "billing.local:8443"
connect_timeout = 1
response_timeout = 0.5
idle_timeout = 30
max_idle_upstream_connections = 0
[service.require_header]
name = "X-Backend-Secret"
value_file = "secrets/backend.secret"
forward = true
[service.tls]
ca_file = "ca.pem"
client_cert_file = "/etc/tunneld/client.pem"
client_key_file = "client.key"
server_name = "Billing.Internal"

[[service]]
name = "postgres"
protocol = "tcp"
listen_port = 5432
upstream = "tcp://db.internal:5432"
connect_timeout = 2
idle_timeout = 3600

[[service]]
name = "reports"
hosts = ["*"]
upstream = "unix:/run/reports.sock"
"""
    )
    loaded = round_trips(path)
    assert loaded.proxy == ProxyConfig(
        http_port=8080,
        max_connections=64,
        max_request_head_bytes=16384,
        request_head_timeout_seconds=2.5,
        allowed_sources=(
            ipaddress.IPv4Network("10.44.0.1/32"),
            ipaddress.IPv6Network("fd44::1/128"),
        ),
        trust_forwarded_headers=True,
        add_forwarded_header=True,
        shutdown_grace_seconds=7.5,
    )
    assert loaded.services == (
        ServiceConfig(
            name="billing",
            upstream=Upstream("https", "::1", 8443),
            protocol="http",
            hosts=("billing", "*.billing.internal", "[fd44::2]", "10.44.0.2"),
            path_prefix="/v1",
            host_rewrite="billing.local:8443",
            require_header=RequireHeader(
                "x-backend-secret", isolated / "secrets" / "backend.secret", forward=True
            ),
            tls=TLSOptions(
                ca_file=isolated / "ca.pem",
                client_cert_file=Path("/etc/tunneld/client.pem"),
                client_key_file=isolated / "client.key",
                server_name="billing.internal",
            ),
            connect_timeout_seconds=1.0,
            response_timeout_seconds=0.5,
            idle_timeout_seconds=30.0,
            max_idle_upstream_connections=0,
        ),
        ServiceConfig(
            name="postgres",
            upstream=Upstream("tcp", "db.internal", 5432),
            protocol="tcp",
            listen_port=5432,
            connect_timeout_seconds=2.0,
            idle_timeout_seconds=3600.0,
        ),
        ServiceConfig(
            name="reports", upstream=Upstream("unix", path=Path("/run/reports.sock")), hosts=("*",)
        ),
    )


def test_defaults() -> None:
    loaded = load_config(write(), environ={})
    assert loaded.proxy == ProxyConfig()
    assert loaded.proxy.shutdown_grace_seconds == 30.0
    assert loaded.services == ()
    loaded = load_config(write([HTTP, TCP]), environ={})
    assert loaded.proxy == ProxyConfig()
    http, tcp = loaded.services
    assert http == ServiceConfig("billing", Upstream("http", "127.0.0.1", 8080), hosts=("billing",))
    assert (http.path_prefix, http.connect_timeout_seconds, http.response_timeout_seconds) == (
        "/",
        5.0,
        60.0,
    )
    assert (http.idle_timeout_seconds, http.max_idle_upstream_connections) == (300.0, 16)
    assert http.require_header is None and http.tls == TLSOptions()
    assert tcp == ServiceConfig(
        "pg", Upstream("tcp", "127.0.0.1", 5432), protocol="tcp", listen_port=5432
    )


def test_require_header_as_an_inline_table_and_relative_to_the_config_directory(
    isolated: Path,
) -> None:
    (isolated / "etc").mkdir()
    header = {"name": "Backend-Secret", "value_file": "backend.secret"}
    path = write([{**HTTP, "require_header": header}], name="etc/tunneld.toml")
    (service,) = load_config(path, environ={}).services
    assert service.require_header == RequireHeader(
        "backend-secret", isolated / "etc" / "backend.secret"
    )


def test_a_tcp_service_may_use_the_http_port_when_there_is_no_http_service() -> None:
    (service,) = load_config(write([{**TCP, "listen_port": 80}]), environ={}).services
    assert service.listen_port == 80


@pytest.mark.parametrize(
    ("text", "upstream"),
    [
        ("http://127.0.0.1:8080", Upstream("http", "127.0.0.1", 8080)),
        ("HTTPS://api.internal:443", Upstream("https", "api.internal", 443)),
        ("http://[::1]:80", Upstream("http", "::1", 80)),
        ("tcp://db:5432", Upstream("tcp", "db", 5432)),
        ("unix:/run/app.sock", Upstream("unix", path=Path("/run/app.sock"))),
        ("unix:/" + "a" * 106, Upstream("unix", path=Path("/" + "a" * 106))),
    ],
)
def test_parse_upstream(text: str, upstream: Upstream) -> None:
    assert parse_upstream(text) == upstream
    assert parse_upstream(str(upstream)) == upstream


# --- one bad value at a time: the exact line a user sees ----------------------------------

ALL_FORMS = "(http://host:port, https://host:port, tcp://host:port or unix:/path)"
DNS = "not a DNS name: letters, digits, '-', '_', dot-separated labels"
SECONDS = "(expected seconds, more than 0 and at most 31536000)"
WILDCARD = '"*" stands alone or as the whole first label, e.g. "*.example.com"'

HTTP_ERRORS = [
    (  # the example of the issue, verbatim
        {"upstream": "htp://x"},
        f'service[0].upstream: "htp://x" is not a valid upstream {ALL_FORMS}',
    ),
    (
        {"upstream": "127.0.0.1:8080"},
        f'service[0].upstream: "127.0.0.1:8080" is not a valid upstream {ALL_FORMS}',
    ),
    (
        {"upstream": "http://127.0.0.1"},
        'service[0].upstream: "http://127.0.0.1" is not a valid upstream (missing :port)',
    ),
    (
        {"upstream": "http://127.0.0.1:0"},
        'service[0].upstream: "http://127.0.0.1:0" is not a valid upstream (port 1–65535)',
    ),
    (
        {"upstream": "https://api:65536"},
        'service[0].upstream: "https://api:65536" is not a valid upstream (port 1–65535)',
    ),
    (
        {"upstream": "http://::1:80"},
        'service[0].upstream: "http://::1:80" is not a valid upstream'
        " (an IPv6 address needs brackets, e.g. [2001:db8::1]:51820)",
    ),
    (
        {"upstream": "http://127.0.0.1:8080/v1"},
        'service[0].upstream: "http://127.0.0.1:8080/v1" is not a valid upstream'
        " (nothing may follow host:port; each request keeps its own path)",
    ),
    (
        {"upstream": "http://127.0.0.1:8080/"},
        'service[0].upstream: "http://127.0.0.1:8080/" is not a valid upstream'
        " (nothing may follow host:port; each request keeps its own path)",
    ),
    (
        {"upstream": "http://127.0.0.1:8080?x=1"},
        'service[0].upstream: "http://127.0.0.1:8080?x=1" is not a valid upstream'
        " (nothing may follow host:port; each request keeps its own path)",
    ),
    (
        {"upstream": "http://user@api:80"},
        f'service[0].upstream: "http://user@api:80" is not a valid upstream ({DNS})',
    ),
    (
        {"upstream": "tcp://127.0.0.1:5432"},
        'service[0].upstream: "tcp://127.0.0.1:5432" is not an upstream for an http service'
        " (http://host:port, https://host:port or unix:/path)",
    ),
    (
        {"upstream": "unix:run/app.sock"},
        'service[0].upstream: "unix:run/app.sock" is not a valid upstream'
        " (the socket path must be absolute, e.g. unix:/run/app.sock)",
    ),
    (
        {"upstream": "unix:"},
        'service[0].upstream: "unix:" is not a valid upstream'
        " (unix: needs a socket path, e.g. unix:/run/app.sock)",
    ),
    (
        {"upstream": "unix://run/app.sock"},
        'service[0].upstream: "unix://run/app.sock" is not a valid upstream'
        " (write unix:/path with one slash; a unix: upstream has no host)",
    ),
    (
        {"upstream": "unix:/" + "a" * 107},
        f'service[0].upstream: "unix:/{"a" * 107}" is not a valid upstream'
        " (the socket path is 108 bytes; Linux allows 107)",
    ),
    (
        {"upstream": DELETE},
        "service[0].upstream: missing; expected http://host:port, https://host:port or"
        " unix:/path (in the file or as TUNNELD_SERVICE_0_UPSTREAM)",
    ),
    ({"upstream": 8080}, "service[0].upstream: expected a string, got integer 8080"),
    (
        {"name": DELETE},
        'service[0].name: missing; expected a unique service name, e.g. "billing"'
        " (in the file or as TUNNELD_SERVICE_0_NAME)",
    ),
    (
        {"name": "bill ing"},
        'service[0].name: "bill ing" is not a service name ([A-Za-z0-9_.-], 1–63 chars)',
    ),
    (
        {"name": "b" * 64},
        f'service[0].name: "{"b" * 64}" is not a service name ([A-Za-z0-9_.-], 1–63 chars)',
    ),
    ({"protocol": "udp"}, 'service[0].protocol: "udp" is not one of "http", "tcp"'),
    ({"protocol": "HTTP"}, 'service[0].protocol: "HTTP" is not one of "http", "tcp"'),
    (
        {"hosts": DELETE},
        'service[0].hosts: missing; expected host names, e.g. ["billing", "*.billing.internal"]'
        " (in the file or as TUNNELD_SERVICE_0_HOSTS)",
    ),
    (
        {"hosts": []},
        'service[0].hosts: must not be empty; expected host names, e.g. ["billing",'
        ' "*.billing.internal"]',
    ),
    ({"hosts": [""]}, 'service[0].hosts[0]: "" is not a host pattern (empty)'),
    (
        {"hosts": ["billing", "bill ing"]},
        'service[0].hosts[1]: "bill ing" is not a host pattern'
        " (contains a space or control character)",
    ),
    ({"hosts": ["a.*.b"]}, f'service[0].hosts[0]: "a.*.b" is not a host pattern ({WILDCARD})'),
    ({"hosts": ["**.x"]}, f'service[0].hosts[0]: "**.x" is not a host pattern ({WILDCARD})'),
    ({"hosts": ["bill!ng"]}, f'service[0].hosts[0]: "bill!ng" is not a host pattern ({DNS})'),
    (
        {"hosts": ["billing:80"]},
        'service[0].hosts[0]: "billing:80" is not a host pattern'
        " (no :port; the port is ignored when matching)",
    ),
    (
        {"hosts": ["fd44::2"]},
        'service[0].hosts[0]: "fd44::2" is not a host pattern'
        " (an IPv6 address needs brackets, e.g. [fd44::2])",
    ),
    (
        {"hosts": ["billing", "Billing."]},
        'service[0].hosts[1]: "Billing." repeats service[0].hosts[0]',
    ),
    (
        {"hosts": "billing"},
        'service[0].hosts: expected a list of host names, e.g. ["billing", "*.billing.internal"],'
        ' got string "billing"',
    ),
    (
        {"path_prefix": "v1"},
        'service[0].path_prefix: "v1" does not start with "/"; e.g. "/v1"',
    ),
    (
        {"path_prefix": "/a b"},
        'service[0].path_prefix: "/a b" is not a URL path: percent-encode spaces and non-ASCII'
        ' characters; no "?" or "#"',
    ),
    (
        {"path_prefix": "/v1?x"},
        'service[0].path_prefix: "/v1?x" is not a URL path: percent-encode spaces and'
        ' non-ASCII characters; no "?" or "#"',
    ),
    (
        {"path_prefix": "/café"},
        'service[0].path_prefix: "/café" is not a URL path: percent-encode spaces and'
        ' non-ASCII characters; no "?" or "#"',
    ),
    (
        {"path_prefix": "/v1/../admin"},
        'service[0].path_prefix: "/v1/../admin" has a "." or ".." segment',
    ),
    (
        {"path_prefix": "/%61dmin"},
        'service[0].path_prefix: "/%61dmin": requests are matched in canonical form;'
        " write it as '/admin'",
    ),
    (
        {"path_prefix": "/v1//x"},
        'service[0].path_prefix: "/v1//x": requests are matched in canonical form;'
        " write it as '/v1/x'",
    ),
    (
        {"path_prefix": "/a%2Fb"},
        "service[0].path_prefix: \"/a%2Fb\": an encoded '/' (%2F) in the prefix",
    ),
    (
        {"path_prefix": "/app;v=1"},
        "service[0].path_prefix: \"/app;v=1\": ';' cannot be matched: paths with ';' must"
        " match the same rule without it",
    ),
    (
        {"host_rewrite": "billing local"},
        f'service[0].host_rewrite: "billing local" is not host or host:port ({DNS})',
    ),
    (
        {"host_rewrite": "a\r\nX-Evil: 1"},
        f'service[0].host_rewrite: "a\\r\\nX-Evil: 1" is not host or host:port ({DNS})',
    ),
    (
        {"host_rewrite": "billing.local:99999"},
        'service[0].host_rewrite: "billing.local:99999" is not host or host:port (port 1–65535)',
    ),
    (
        {"host_rewrite": "*.billing"},
        f'service[0].host_rewrite: "*.billing" is not host or host:port ({DNS})',
    ),
    ({"connect_timeout": 0}, f"service[0].connect_timeout: 0 is out of range {SECONDS}"),
    ({"response_timeout": -1.5}, f"service[0].response_timeout: -1.5 is out of range {SECONDS}"),
    ({"idle_timeout": 0.0}, f"service[0].idle_timeout: 0.0 is out of range {SECONDS}"),
    ({"idle_timeout": float("inf")}, f"service[0].idle_timeout: inf is out of range {SECONDS}"),
    ({"idle_timeout": float("nan")}, f"service[0].idle_timeout: nan is out of range {SECONDS}"),
    (
        {"idle_timeout": 31536001},
        f"service[0].idle_timeout: 31536001 is out of range {SECONDS}",
    ),
    (
        {"connect_timeout": "5"},
        'service[0].connect_timeout: expected a number of seconds, got string "5"',
    ),
    (
        {"connect_timeout": True},
        "service[0].connect_timeout: expected a number of seconds, got boolean true",
    ),
    (
        {"max_idle_upstream_connections": -1},
        "service[0].max_idle_upstream_connections: -1 is out of range (expected 0–1024)",
    ),
    (
        {"listen_port": 8080},
        'service[0].listen_port: not allowed with protocol = "http"; http services share'
        " proxy.http_port (listen_port is for tcp services)",
    ),
    (
        {"tls": {"verify": False}},
        'service[0].tls: only for https:// upstreams; upstream is "http://127.0.0.1:8080"',
    ),
    (
        {"upstream": "unix:/run/a.sock", "tls": {}},
        'service[0].tls: only for https:// upstreams; upstream is "unix:/run/a.sock"',
    ),
    (
        {"require_header": {}},
        'service[0].require_header.name: missing; expected a header name, e.g. "X-Backend-Secret"'
        " (in the file or as TUNNELD_SERVICE_0_REQUIRE_HEADER_NAME)\n"
        "service[0].require_header.value_file: missing; expected the file that holds the secret"
        " (mode 0600) (in the file or as TUNNELD_SERVICE_0_REQUIRE_HEADER_VALUE_FILE)",
    ),
    (
        {"require_header": {"name": "X Secret", "value_file": "s"}},
        'service[0].require_header.name: "X Secret" is not a header name'
        " (letters, digits, !#$%&'*+-.^_`|~)",
    ),
    (
        {"require_header": {"name": "Host", "value_file": "s"}},
        'service[0].require_header.name: "Host" is a header the proxy itself reads or sets;'
        ' use one of your own, e.g. "X-Backend-Secret"',
    ),
    (
        {"require_header": {"name": "Proxy-Secret", "value_file": "s"}},
        'service[0].require_header.name: "Proxy-Secret" is a header the proxy itself reads or'
        ' sets; use one of your own, e.g. "X-Backend-Secret"',
    ),
    (
        {"require_header": {"name": "X_Secret", "value_file": "s"}},
        "service[0].require_header.name: \"X_Secret\": names with '_' are not forwarded; use '-'",
    ),
    (
        {"require_header": {"name": "X-Secret", "value_file": ""}},
        "service[0].require_header.value_file: must not be empty; expected a file path",
    ),
    (
        {"require_header": {"name": "X-Secret", "value_file": "s", "forward": "yes"}},
        'service[0].require_header.forward: expected true or false, got string "yes"',
    ),
    (
        {"require_header": "X-Secret"},
        'service[0].require_header: expected a table [require_header], got string "X-Secret"',
    ),
    (
        {"upstreams": "http://127.0.0.1:1"},
        'service[0].upstreams: unknown key; did you mean "upstream"?',
    ),
]

HTTPS_ERRORS = [
    (
        {"client_key_file": "client.key"},
        "service[0].tls.client_key_file: client_cert_file is not set;"
        " a client key needs its certificate",
    ),
    (
        {"ca_file": "ca.pem", "verify": False},
        "service[0].tls.ca_file: has no effect with verify = false; remove one of them",
    ),
    (
        {"server_name": "api internal"},
        f'service[0].tls.server_name: "api internal" is not a server name ({DNS})',
    ),
    ({"verify": 0}, "service[0].tls.verify: expected true or false, got integer 0"),
    (
        {"verfy": False},
        'service[0].tls.verfy: unknown key; did you mean "verify"?',
    ),
]

TCP_ERRORS = [
    (
        {"listen_port": DELETE},
        "service[0].listen_port: missing; expected the port to listen on at the tunnel address,"
        " e.g. 5432 (in the file or as TUNNELD_SERVICE_0_LISTEN_PORT)",
    ),
    ({"listen_port": 0}, "service[0].listen_port: 0 is out of range (expected 1–65535)"),
    ({"listen_port": 65536}, "service[0].listen_port: 65536 is out of range (expected 1–65535)"),
    (
        {"upstream": "http://127.0.0.1:5432"},
        'service[0].upstream: "http://127.0.0.1:5432" is not an upstream for a tcp service'
        " (tcp://host:port or unix:/path)",
    ),
    (
        {"upstream": "tcp://127.0.0.1:5432/db"},
        'service[0].upstream: "tcp://127.0.0.1:5432/db" is not a valid upstream'
        " (nothing may follow host:port)",
    ),
    (
        {"upstream": "tcp://db"},
        'service[0].upstream: "tcp://db" is not a valid upstream (missing :port)',
    ),
    (
        {"upstream": DELETE},
        "service[0].upstream: missing; expected tcp://host:port or unix:/path"
        " (in the file or as TUNNELD_SERVICE_0_UPSTREAM)",
    ),
    ({"idle_timeout": -5}, f"service[0].idle_timeout: -5 is out of range {SECONDS}"),
] + [
    (
        {key: value},
        f'service[0].{key}: not allowed with protocol = "tcp"; it is an http setting',
    )
    for key, value in [
        ("hosts", ["pg"]),
        ("path_prefix", "/"),
        ("host_rewrite", "db"),
        ("response_timeout", 5),
        ("max_idle_upstream_connections", 4),
        ("require_header", {"name": "X-Secret", "value_file": "s"}),
        ("tls", {"verify": True}),
    ]
]

PROXY_ERRORS = [
    ({"http_port": 0}, "proxy.http_port: 0 is out of range (expected 1–65535)"),
    ({"max_connections": 0}, "proxy.max_connections: 0 is out of range (expected 1–1048576)"),
    (
        {"max_request_head_bytes": 512},
        "proxy.max_request_head_bytes: 512 is out of range (expected 1024–1048576)",
    ),
    ({"request_head_timeout": 0}, f"proxy.request_head_timeout: 0 is out of range {SECONDS}"),
    ({"shutdown_grace": 0}, f"proxy.shutdown_grace: 0 is out of range {SECONDS}"),
    (
        {"shutdown_grace": "30s"},
        'proxy.shutdown_grace: expected a number of seconds, got string "30s"',
    ),
    (
        {"allowed_sources": ["10.44.0.0/24"]},
        "proxy.allowed_sources[0]: 10.44.0.0/24 is not inside any gateway's allowed_ips"
        " (10.44.0.1/32, fd44::1/128); only gateway peers can connect through the tunnel",
    ),
    (
        {"allowed_sources": ["10.44.0.1/32", "192.0.2.1"]},
        "proxy.allowed_sources[1]: 192.0.2.1/32 is not inside any gateway's allowed_ips"
        " (10.44.0.1/32, fd44::1/128); only gateway peers can connect through the tunnel",
    ),
    (
        {"allowed_sources": []},
        'proxy.allowed_sources: must not be empty; expected networks, e.g. ["10.44.0.1/32"]',
    ),
    (
        {"allowed_sources": ["gateway"]},
        'proxy.allowed_sources[0]: "gateway" is not an IP network, e.g. 10.44.0.1/32',
    ),
    (
        {"trust_forwarded_headers": "yes"},
        'proxy.trust_forwarded_headers: expected true or false, got string "yes"',
    ),
    (
        {"add_forwarded_header": 1},
        "proxy.add_forwarded_header: expected true or false, got integer 1",
    ),
    ({"http_prot": 8080}, 'proxy.http_prot: unknown key; did you mean "http_port"?'),
]


@pytest.mark.parametrize(("changes", "expected"), HTTP_ERRORS)
def test_http_service_errors(changes: dict[str, Any], expected: str) -> None:
    lines = [f"tunneld.toml: {line}" for line in expected.split("\n")]
    assert problems(write([changed(HTTP, changes)])) == lines


@pytest.mark.parametrize(("changes", "expected"), HTTPS_ERRORS)
def test_tls_errors(changes: dict[str, Any], expected: str) -> None:
    service = {**HTTP, "upstream": "https://api.internal:443", "tls": changes}
    assert problems(write([service])) == [f"tunneld.toml: {expected}"]


@pytest.mark.parametrize(("changes", "expected"), TCP_ERRORS)
def test_tcp_service_errors(changes: dict[str, Any], expected: str) -> None:
    assert problems(write([changed(TCP, changes)])) == [f"tunneld.toml: {expected}"]


@pytest.mark.parametrize(("changes", "expected"), PROXY_ERRORS)
def test_proxy_errors(changes: dict[str, Any], expected: str) -> None:
    assert problems(write([HTTP], proxy=changes)) == [f"tunneld.toml: {expected}"]


def test_an_invalid_protocol_refuses_no_key_of_either_kind() -> None:
    service = {**HTTP, "protocol": "udp", "listen_port": 53}
    assert problems(write([service])) == [
        'tunneld.toml: service[0].protocol: "udp" is not one of "http", "tcp"'
    ]


def test_proxy_and_service_of_the_wrong_type() -> None:
    path = Path("tunneld.toml")
    path.write_text("proxy = 5\n" + BASE + "[service]\nname = 'x'\n")
    assert problems(path) == [
        "tunneld.toml: proxy: expected a table [proxy], got integer 5",
        "tunneld.toml: service: expected an array of tables [[service]], got table",
    ]


def test_secret_given_inline_is_refused_and_not_echoed() -> None:
    header = {"name": "X-Secret", "value": "hunter2-secret"}
    lines = problems(write([{**HTTP, "require_header": header}]))
    assert lines == [
        "tunneld.toml: service[0].require_header.value_file: missing; expected the file that"
        " holds the secret (mode 0600) (in the file or as"
        " TUNNELD_SERVICE_0_REQUIRE_HEADER_VALUE_FILE)",
        'tunneld.toml: service[0].require_header.value: unknown key; did you mean "value_file"?;'
        " secrets are never inline: put it in a 0600 file, set value_file",
    ]
    assert "hunter2" not in "\n".join(lines)


# --- rules across services ------------------------------------------------------------------


def test_duplicate_service_names() -> None:
    second = {**TCP, "name": "billing"}
    assert problems(write([HTTP, second, {**TCP, "name": "billing", "listen_port": 1}])) == [
        'tunneld.toml: service[1].name: "billing" is taken by service[0]',
        'tunneld.toml: service[2].name: "billing" is taken by service[0]',
    ]


def test_rule_after_a_catch_all_is_unreachable() -> None:
    catch_all = {**HTTP, "name": "all", "hosts": ["*"]}
    later = {**HTTP, "name": "v1", "hosts": ["api"], "path_prefix": "/v1"}
    assert problems(write([catch_all, TCP, later])) == [
        'tunneld.toml: service[2]: unreachable: service[0] ("all") comes first and'
        " matches every request this rule matches"
    ]


def test_catch_all_below_a_prefix_shadows_only_rules_below_it() -> None:
    catch_v1 = {**HTTP, "name": "all-v1", "hosts": ["*"], "path_prefix": "/v1"}
    other = {**HTTP, "name": "other", "hosts": ["api"], "path_prefix": "/v2"}
    below = {**HTTP, "name": "below", "hosts": ["api"], "path_prefix": "/v1/x"}
    assert problems(write([catch_v1, other, below])) == [
        'tunneld.toml: service[2]: unreachable: service[0] ("all-v1") comes first and'
        " matches every request this rule matches"
    ]


def test_same_hosts_with_a_covering_prefix_are_unreachable() -> None:
    broad = {**HTTP, "name": "api", "hosts": ["api", "*.api.internal"]}
    narrow = {**HTTP, "name": "v1", "hosts": ["x.api.internal", "API"], "path_prefix": "/v1"}
    assert problems(write([broad, narrow])) == [
        'tunneld.toml: service[1]: unreachable: service[0] ("api") comes first and'
        " matches every request this rule matches"
    ]
    # The other way round both are reachable: /v1 first, everything else after.
    assert len(load_config(write([narrow, broad]), environ={}).services) == 2


def test_rule_covered_by_several_earlier_rules_names_them_all() -> None:
    a = {**HTTP, "name": "a", "hosts": ["a"]}
    b = {**HTTP, "name": "b", "hosts": ["*.b"], "path_prefix": "/v1"}
    both = {**HTTP, "name": "both", "hosts": ["x.b", "a"], "path_prefix": "/v1/x"}
    assert problems(write([a, b, both])) == [
        'tunneld.toml: service[2]: unreachable: service[0] ("a") and service[1] ("b") come first'
        " and between them match every request this rule matches"
    ]


def test_tcp_listen_port_must_differ_from_http_port_and_from_each_other() -> None:
    services = [
        HTTP,
        {**TCP, "listen_port": 80},
        {**TCP, "name": "pg2"},
        {**TCP, "name": "pg3"},
    ]
    assert problems(write(services)) == [
        "tunneld.toml: service[1].listen_port: 80 is proxy.http_port, where the http services"
        " listen; choose another port (or change proxy.http_port)",
        "tunneld.toml: service[3].listen_port: 5432 is taken by service[2]",
    ]
    assert problems(write([HTTP, {**TCP, "listen_port": 8080}], proxy={"http_port": 8080})) == [
        "tunneld.toml: service[1].listen_port: 8080 is proxy.http_port, where the http services"
        " listen; choose another port (or change proxy.http_port)",
    ]


# --- environment ----------------------------------------------------------------------------


def test_environment_sets_proxy_and_services(isolated: Path) -> None:
    environ = {
        "TUNNELD_PROXY_HTTP_PORT": "8080",
        "TUNNELD_PROXY_REQUEST_HEAD_TIMEOUT": "2.5",
        "TUNNELD_PROXY_ALLOWED_SOURCES": "10.44.0.1/32",
        "TUNNELD_PROXY_TRUST_FORWARDED_HEADERS": "TRUE",
        "TUNNELD_PROXY_ADD_FORWARDED_HEADER": "0",
        "TUNNELD_PROXY_SHUTDOWN_GRACE": "90",
        "TUNNELD_SERVICE_0_NAME": "billing",
        "TUNNELD_SERVICE_0_HOSTS": "billing, *.billing.internal",
        "TUNNELD_SERVICE_0_UPSTREAM": "https://127.0.0.1:8443",
        "TUNNELD_SERVICE_0_CONNECT_TIMEOUT": ".5",
        "TUNNELD_SERVICE_0_REQUIRE_HEADER_NAME": "X-Backend-Secret",
        "TUNNELD_SERVICE_0_REQUIRE_HEADER_VALUE_FILE": "backend.secret",
        "TUNNELD_SERVICE_0_REQUIRE_HEADER_FORWARD": "1",
        "TUNNELD_SERVICE_0_TLS_CA_FILE": "/etc/ca.pem",
        "TUNNELD_SERVICE_0_TLS_SERVER_NAME": "billing.internal",
        "TUNNELD_SERVICE_1_NAME": "pg",
        "TUNNELD_SERVICE_1_PROTOCOL": "tcp",
        "TUNNELD_SERVICE_1_LISTEN_PORT": "5432",
        "TUNNELD_SERVICE_1_UPSTREAM": "unix:/run/postgresql/.s.PGSQL.5432",
        "TUNNELD_SERVICE_1_IDLE_TIMEOUT": "3600",
    }
    loaded = round_trips(write(), environ)
    assert loaded.proxy == ProxyConfig(
        http_port=8080,
        request_head_timeout_seconds=2.5,
        allowed_sources=(ipaddress.IPv4Network("10.44.0.1/32"),),
        trust_forwarded_headers=True,
        shutdown_grace_seconds=90.0,
    )
    billing, pg = loaded.services
    assert billing.hosts == ("billing", "*.billing.internal")
    assert billing.connect_timeout_seconds == 0.5
    assert billing.require_header == RequireHeader(
        "x-backend-secret", isolated / "backend.secret", forward=True
    )
    assert billing.tls == TLSOptions(ca_file=Path("/etc/ca.pem"), server_name="billing.internal")
    assert pg.upstream == Upstream("unix", path=Path("/run/postgresql/.s.PGSQL.5432"))
    assert (pg.listen_port, pg.idle_timeout_seconds) == (5432, 3600.0)


def test_environment_overrides_a_service_of_the_file() -> None:
    path = write([HTTP, TCP])
    environ = {"TUNNELD_SERVICE_1_LISTEN_PORT": "6432", "TUNNELD_SERVICE_0_HOSTS": "a,b"}
    http, tcp = load_config(path, environ=environ).services
    assert http.hosts == ("a", "b")
    assert tcp.listen_port == 6432


def test_bad_environment_values_name_the_variable() -> None:
    https = {**HTTP, "upstream": "https://api:443"}
    environ = {
        "TUNNELD_PROXY_TRUST_FORWARDED_HEADERS": "yes",
        "TUNNELD_PROXY_REQUEST_HEAD_TIMEOUT": "10s",
        "TUNNELD_SERVICE_0_IDLE_TIMEOUT": "0",
        "TUNNELD_SERVICE_0_UPSTREAM": "htp://x",
        "TUNNELD_SERVICE_0_TLS_CA_FLE": "/etc/ca.pem",
        "TUNNELD_SERVICE_0_REQUIRE_HEADER_VALUE": "hunter2-secret",
    }
    lines = problems(write([https]), environ)
    assert lines == [
        'environment: TUNNELD_PROXY_REQUEST_HEAD_TIMEOUT: "10s" is not a number of seconds,'
        " e.g. 10 or 0.5",
        'environment: TUNNELD_PROXY_TRUST_FORWARDED_HEADERS: "yes" is not a boolean'
        " (true, false, 1 or 0)",
        f'environment: TUNNELD_SERVICE_0_UPSTREAM: "htp://x" is not a valid upstream {ALL_FORMS}',
        f"environment: TUNNELD_SERVICE_0_IDLE_TIMEOUT: 0 is out of range {SECONDS}",
        # A missing key is named by its path: no variable set it.
        "tunneld.toml: service[0].require_header.name: missing; expected a header name,"
        ' e.g. "X-Backend-Secret" (in the file or as TUNNELD_SERVICE_0_REQUIRE_HEADER_NAME)',
        "tunneld.toml: service[0].require_header.value_file: missing; expected the file that"
        " holds the secret (mode 0600) (in the file or as"
        " TUNNELD_SERVICE_0_REQUIRE_HEADER_VALUE_FILE)",
        "environment: TUNNELD_SERVICE_0_REQUIRE_HEADER_VALUE: unknown variable; did you mean"
        " TUNNELD_SERVICE_0_REQUIRE_HEADER_VALUE_FILE?; secrets are never inline: put it in a"
        " 0600 file, set value_file",
        "environment: TUNNELD_SERVICE_0_TLS_CA_FLE: unknown variable;"
        " did you mean TUNNELD_SERVICE_0_TLS_CA_FILE?",
    ]
    assert "hunter2" not in "\n".join(lines)


# --- properties -----------------------------------------------------------------------------

text_without_surrogates = st.text(st.characters(exclude_categories=["Cs"]))
toml_scalars = st.one_of(
    text_without_surrogates,
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.floats(),
)
toml_values = st.one_of(
    toml_scalars,
    st.lists(toml_scalars, max_size=3),
    st.dictionaries(st.sampled_from(["name", "value_file", "ca_file", "verify"]), toml_scalars),
)
VALID_HTTP: dict[str, list[Any]] = {
    "name": ["billing", "a.b_c-d"],
    "hosts": [["*"], ["billing", "*.Billing.internal."], ["[fd44::2]", "10.44.0.2"]],
    "path_prefix": ["/", "/v1", "/v1/", "/a%20b/@:x"],
    "upstream": ["http://127.0.0.1:8080", "http://[::1]:1", "unix:/run/a b.sock"],
    "host_rewrite": ["billing.local", "billing.local:8080", "[::1]:80", "10.0.0.1"],
    "connect_timeout": [1, 0.001, 31536000, 2.5],
    "response_timeout": [60, 0.1],
    "idle_timeout": [300, 1e-3],
    "max_idle_upstream_connections": [0, 1024],
    "require_header": [
        {"name": "X-Secret", "value_file": "s"},
        {"name": "a", "value_file": "/s", "forward": True},
    ],
}


def service_changes(*, anything: bool) -> st.SearchStrategy[dict[str, Any]]:
    def value(key: str) -> st.SearchStrategy[Any]:
        valid = st.sampled_from(VALID_HTTP[key])
        return valid | toml_values if anything else valid

    change = st.sampled_from(sorted(VALID_HTTP)).flatmap(
        lambda key: st.tuples(st.just(key), value(key))
    )
    return st.lists(change, max_size=5).map(dict)


@FUZZ_SETTINGS
@given(service_changes(anything=True), st.sampled_from(["http", "tcp", "udp"]))
def test_arbitrary_values_raise_only_config_error(changes: dict[str, Any], protocol: str) -> None:
    with contextlib.suppress(ConfigError):
        load_config(write([{**HTTP, **changes, "protocol": protocol}]), environ={})


@FUZZ_SETTINGS
@given(service_changes(anything=False))
def test_valid_services_round_trip(changes: dict[str, Any]) -> None:
    round_trips(write([changed(HTTP, changes)]))


@FUZZ_SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(
            [f"TUNNELD_PROXY_{key.upper()}" for key in ("http_port", "request_head_timeout",
                                                        "allowed_sources", "add_forwarded_header")]
            + [f"TUNNELD_SERVICE_{i}_{key.upper()}" for i in (0, 1) for key in
               ("name", "hosts", "upstream", "protocol", "listen_port", "tls_verify",
                "require_header_name", "connect_timeout")]
        ),
        text_without_surrogates.filter(lambda value: "\0" not in value),
        max_size=4,
    )
)  # fmt: skip
def test_arbitrary_environment_values_raise_only_config_error(environ: dict[str, str]) -> None:
    with contextlib.suppress(ConfigError):
        load_config(write([HTTP]), environ=environ)
