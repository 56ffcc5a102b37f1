"""Connecting to origins: TCP, unix sockets and TLS, each under the service's connect timeout.

Failures become :class:`~tunneld.errors.UpstreamError` with a bounded ``kind`` so the HTTP side can
answer 502/504 and metrics can count them without parsing messages. TLS contexts are built once per
service (loading CA files and client certificates is not free) and cached by their options.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import ssl

import trio

from tunneld.config_proxy import TLSOptions, Upstream
from tunneld.errors import UpstreamError
from tunneld.proxy import eager

_KIND_BY_ERRNO = {
    errno.ECONNREFUSED: "refused",
    errno.ENOENT: "refused",  # a unix socket path with nobody behind it
    errno.ETIMEDOUT: "timeout",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
}


@functools.cache
def tls_context(options: TLSOptions) -> ssl.SSLContext:
    """A client context for ``options`` (cached: options are frozen and hashable)."""
    context = ssl.create_default_context(
        cafile=os.fspath(options.ca_file) if options.ca_file else None
    )
    if options.client_cert_file is not None:
        context.load_cert_chain(
            os.fspath(options.client_cert_file),
            os.fspath(options.client_key_file) if options.client_key_file else None,
        )
    if not options.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def open_upstream(
    upstream: Upstream, tls: TLSOptions, *, connect_timeout_seconds: float
) -> trio.abc.Stream:
    """Connect to ``upstream`` (and finish the TLS handshake for https) within the timeout."""
    try:
        with trio.fail_after(connect_timeout_seconds):
            stream = await _connect(upstream)
            if upstream.scheme != "https":
                return stream
            tls_stream = trio.SSLStream(
                stream,
                tls_context(tls),
                server_hostname=tls.server_name or upstream.host,
                https_compatible=True,
            )
            try:
                await tls_stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return tls_stream
    except trio.TooSlowError:
        raise UpstreamError(
            "timeout", f"{upstream}: no connection within {connect_timeout_seconds:g}s"
        ) from None
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLError):
            raise UpstreamError("tls", f"{upstream}: TLS handshake failed: {cause.reason}") from exc
        raise UpstreamError("closed", f"{upstream}: closed during the TLS handshake") from exc
    except socket.gaierror as exc:
        raise UpstreamError("dns", f"{upstream}: {exc.strerror or exc}") from exc
    except OSError as exc:
        code = _first_errno(exc)
        kind = _KIND_BY_ERRNO.get(code or 0, "unreachable")
        reason = os.strerror(code) if code else str(exc)
        raise UpstreamError(kind, f"{upstream}: {reason}") from exc


async def _connect(upstream: Upstream) -> eager.EagerSocketStream:
    """The plain connection. An IP literal (the usual origin: 127.0.0.1) is connected directly;
    only a name goes through trio's resolver and happy eyeballs, which cost a thread hop."""
    if upstream.path is not None:  # unix: (the validator gives every unix upstream a path)
        return await eager.connect(socket.AF_UNIX, os.fspath(upstream.path))
    family = _literal_family(upstream.host)
    if family is not None:
        return await eager.connect(family, (upstream.host, upstream.port))
    stream = await trio.open_tcp_stream(upstream.host, upstream.port)
    return eager.EagerSocketStream.from_trio(stream)


@functools.lru_cache(maxsize=256)
def _literal_family(host: str) -> socket.AddressFamily | None:
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return None  # a name
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _first_errno(exc: BaseException) -> int | None:
    """The errno behind ``exc``; trio's happy-eyeballs connect hides it in a group."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        for inner in cause.exceptions:
            if (code := _first_errno(inner)) is not None:
                return code
    return None
