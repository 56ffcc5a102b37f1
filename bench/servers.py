"""Configuration files of the programs under test (pure: text in, text out).

All of them run in the host namespace. The origin is one nginx: it serves on 127.0.0.1 (what the
proxies forward to) and, for ``direct``, on the connector's tunnel address too. The references
are configured as a careful operator would, with tunneld's own defaults where they have a
counterpart: one nginx worker and one HAProxy thread (tunneld is one Python thread), the same
number of idle keep-alive connections to the origin for nginx and tunneld, no access log, and
forwarded headers set as tunneld sets them.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

HOST_TUNNEL = "10.44.0.2"
GATEWAY_TUNNEL = "10.44.0.1"
GATEWAY_UNDERLAY = "198.18.0.1"
HOST_UNDERLAY = "198.18.0.2"
GATEWAY_PORT = 51820

ORIGIN_PORT = 8080  # origin nginx on 127.0.0.1
DIRECT_PORT = 8081  # the same nginx on the tunnel address
NGINX_PORT = 8082  # nginx reverse proxy on the tunnel address
HAPROXY_PORT = 8083  # HAProxy, TCP mode
TUNNELD_HTTP_PORT = 80  # tunneld's proxy.http_port (its default)
TUNNELD_TCP_PORT = 8085  # a tunneld tcp service

BULK_ORIGIN_PORT = 5201  # iperf3 server on 127.0.0.1
BULK_DIRECT_PORT = 5202  # iperf3 server on the tunnel address
BULK_HAPROXY_PORT = 5203
BULK_TUNNELD_PORT = 5204

ORIGIN_STATUS_PATH = "/nginx-status"  # connections the origin accepted (stub_status)
HTTP_HOST = "bench"  # the Host header every request carries; tunneld routes on it
SMALL_BODY = "tunneld bench: small response.\n"  # 31 bytes
BODY_FILES = {"10k.bin": 10 * 1024, "1m.bin": 1024 * 1024}
# Idle keep-alive connections each HTTP proxy keeps to the origin (nginx `keepalive`, tunneld
# `max_idle_upstream_connections`): above the 50 connections of the main workloads, so neither
# proxy closes and reopens origin connections there (tunneld's default is 16).
UPSTREAM_IDLE_CONNECTIONS = 64


def write_body_files(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, size in BODY_FILES.items():
        pattern = b"0123456789abcdef" * (size // 16 + 1)
        (directory / name).write_bytes(pattern[:size])


def _nginx_common(workdir: Path, name: str, workers: str) -> str:
    return textwrap.dedent(
        f"""\
        # root: the work directory (body files, spool) is private to the harness (0700).
        user root;
        worker_processes {workers};
        worker_rlimit_nofile 65536;
        daemon off;
        master_process on;
        pid {workdir}/{name}.pid;
        error_log {workdir}/{name}-error.log warn;
        events {{
            worker_connections 16384;
        }}
        """
    )


def nginx_origin_config(workdir: Path) -> str:
    """The origin: a fixed 31-byte body at ``/``, 10 KB and 1 MB files under ``/files/``."""
    return _nginx_common(workdir, "origin", "auto") + textwrap.dedent(
        f"""\
        http {{
            access_log off;
            client_body_temp_path {workdir}/spool/origin-body;
            proxy_temp_path {workdir}/spool/origin-proxy;
            keepalive_requests 10000000;
            keepalive_timeout 300s;
            sendfile on;
            tcp_nopush on;
            tcp_nodelay on;
            server {{
                listen 127.0.0.1:{ORIGIN_PORT} backlog=4096;
                listen {HOST_TUNNEL}:{DIRECT_PORT} backlog=4096;
                location = / {{
                    default_type text/plain;
                    return 200 "{SMALL_BODY.strip()}\\n";
                }}
                location /files/ {{
                    default_type application/octet-stream;
                    alias {workdir}/www/;
                }}
                location = {ORIGIN_STATUS_PATH} {{
                    stub_status;
                    allow 127.0.0.1;
                    deny all;
                }}
            }}
        }}
        """
    )


def nginx_proxy_config(workdir: Path, upstream_idle: int = UPSTREAM_IDLE_CONNECTIONS) -> str:
    """The HTTP reference: nginx on the tunnel address, keep-alive to the origin."""
    return _nginx_common(workdir, "nginx-proxy", "1") + textwrap.dedent(
        f"""\
        http {{
            access_log off;
            client_body_temp_path {workdir}/spool/proxy-body;
            proxy_temp_path {workdir}/spool/proxy-proxy;
            keepalive_requests 10000000;
            keepalive_timeout 300s;
            tcp_nodelay on;
            upstream origin {{
                server 127.0.0.1:{ORIGIN_PORT};
                keepalive {upstream_idle};
                keepalive_requests 10000000;
                keepalive_timeout 300s;
            }}
            server {{
                listen {HOST_TUNNEL}:{NGINX_PORT} backlog=4096;
                location / {{
                    proxy_pass http://origin;
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                    proxy_set_header Host $host;
                    proxy_set_header X-Forwarded-For $remote_addr;
                    proxy_set_header X-Forwarded-Proto $scheme;
                    proxy_set_header X-Forwarded-Host $host;
                    # Stream what does not fit the buffers instead of spooling it to disk.
                    proxy_max_temp_file_size 0;
                }}
            }}
        }}
        """
    )


def haproxy_config() -> str:
    """The L4 reference: HAProxy in TCP mode, one thread."""
    return textwrap.dedent(
        f"""\
        global
            maxconn 8000
            nbthread 1
        defaults
            mode tcp
            maxconn 8000
            timeout connect 5s
            timeout client 300s
            timeout server 300s
        listen http_tcp
            bind {HOST_TUNNEL}:{HAPROXY_PORT}
            server origin 127.0.0.1:{ORIGIN_PORT}
        listen bulk
            bind {HOST_TUNNEL}:{BULK_HAPROXY_PORT}
            server iperf 127.0.0.1:{BULK_ORIGIN_PORT}
        """
    )


def tunneld_config(
    ifname: str,
    key_file: Path,
    gateway_public_key: str,
    upstream_idle: int = UPSTREAM_IDLE_CONNECTIONS,
) -> str:
    """tunneld with its defaults: an http service, a tcp service, and a tcp one for iperf3."""
    return textwrap.dedent(
        f"""\
        [interface]
        name = "{ifname}"
        private_key_file = "{key_file}"
        address = ["{HOST_TUNNEL}/24"]
        backend = "userspace"
        # The references (direct, nginx, HAProxy) listen on the same tunnel address, which
        # tunneld's filter would drop: this topology measures the proxies, not the filter.
        firewall = false

        [[gateway]]
        name = "bench-gw"
        public_key = "{gateway_public_key}"
        endpoints = ["{GATEWAY_UNDERLAY}:{GATEWAY_PORT}"]
        allowed_ips = ["{GATEWAY_TUNNEL}/32"]

        [proxy]
        http_port = {TUNNELD_HTTP_PORT}

        [[service]]
        name = "bench-http"
        hosts = ["{HTTP_HOST}"]
        upstream = "http://127.0.0.1:{ORIGIN_PORT}"
        max_idle_upstream_connections = {upstream_idle}

        [[service]]
        name = "bench-tcp"
        protocol = "tcp"
        listen_port = {TUNNELD_TCP_PORT}
        upstream = "tcp://127.0.0.1:{ORIGIN_PORT}"

        [[service]]
        name = "bench-bulk"
        protocol = "tcp"
        listen_port = {BULK_TUNNELD_PORT}
        upstream = "tcp://127.0.0.1:{BULK_ORIGIN_PORT}"
        """
    )
