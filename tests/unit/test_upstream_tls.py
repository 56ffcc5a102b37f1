"""https origins: verification against a CA file, SNI / server_name, and mTLS client certificates.

A throwaway CA issues the origin's certificate (for "origin.test", which does not resolve: the
proxy dials 127.0.0.1 and verifies the name it is told) and the proxy's client certificate.
"""

from __future__ import annotations

import datetime
import ssl
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tunneld.config_proxy import ProxyConfig, ServiceConfig, TLSOptions, Upstream
from tunneld.errors import UpstreamError
from tunneld.proxy.http import HttpProxy
from tunneld.proxy.upstream import open_upstream


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_pem(path: Path, *objects: bytes) -> Path:
    path.write_bytes(b"".join(objects))
    path.chmod(0o600)
    return path


class PKI:
    def __init__(self, directory: Path, ca_name: str = "tunneld test CA") -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(ca_name))
            .issuer_name(_name(ca_name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = _write_pem(
            directory / f"{ca_name.replace(' ', '-')}.pem",
            self.certificate.public_bytes(serialization.Encoding.PEM),
        )

    def issue(self, name: str, *, server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False
            )
        certificate = builder.sign(self.key, hashes.SHA256())
        cert_file = _write_pem(
            self.directory / f"{name}.crt", certificate.public_bytes(serialization.Encoding.PEM)
        )
        key_file = _write_pem(
            self.directory / f"{name}.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        return cert_file, key_file


async def _https_origin(
    context: ssl.SSLContext, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    async def answer(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some(4096)
            peer = stream.getpeercert()
            who = dict(item[0] for item in peer["subject"])["commonName"] if peer else "anonymous"
            body = f"hello {who}".encode()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_ssl_over_tcp_listeners(0, context, host="127.0.0.1")
    task_status.started(listeners[0].transport_listener.socket.getsockname()[1])
    await trio.serve_listeners(answer, listeners)


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path)


def _origin_context(pki: PKI, *, require_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*pki.issue("origin.test", server=True))
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=pki.ca_file)
    return context


async def _get_through_proxy(service: ServiceConfig) -> bytes:
    proxy = HttpProxy([service], ProxyConfig())
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy.handle, server, "10.44.0.1")
        await client.send_all(b"GET / HTTP/1.1\r\nHost: secure\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := await client.receive_some(65536):
            reply += chunk
    await proxy.aclose()
    return reply


async def test_mtls_to_an_origin_verified_by_ca_file_and_server_name(pki: PKI) -> None:
    client_cert, client_key = pki.issue("tunneld-connector", server=False)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                _https_origin, _origin_context(pki, require_client_cert=True)
            )
            tls = TLSOptions(
                ca_file=pki.ca_file,
                client_cert_file=client_cert,
                client_key_file=client_key,
                server_name="origin.test",
            )
            service = ServiceConfig(
                "secure", Upstream("https", "127.0.0.1", port), hosts=("secure",), tls=tls
            )
            reply = await _get_through_proxy(service)
            assert reply.startswith(b"HTTP/1.1 200 ")
            assert reply.endswith(b"hello tunneld-connector")
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("mistake", ["wrong-ca", "wrong-name", "no-client-cert"])
async def test_tls_mistakes_are_502_with_kind_tls(pki: PKI, tmp_path: Path, mistake: str) -> None:
    client_cert, client_key = pki.issue("tunneld-connector", server=False)
    other_ca = PKI(tmp_path, ca_name="another CA")
    tls = TLSOptions(
        ca_file=other_ca.ca_file if mistake == "wrong-ca" else pki.ca_file,
        client_cert_file=None if mistake == "no-client-cert" else client_cert,
        client_key_file=None if mistake == "no-client-cert" else client_key,
        server_name="elsewhere.test" if mistake == "wrong-name" else "origin.test",
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                _https_origin, _origin_context(pki, require_client_cert=True)
            )
            upstream = Upstream("https", "127.0.0.1", port)
            if mistake != "no-client-cert":
                # The handshake itself fails on our side: a tls-kind error.
                with pytest.raises(UpstreamError) as caught:
                    stream = await open_upstream(upstream, tls, connect_timeout_seconds=5)
                    await stream.aclose()
                assert caught.value.kind == "tls"
            service = ServiceConfig("secure", upstream, hosts=("secure",), tls=tls)
            reply = await _get_through_proxy(service)
            assert reply.startswith(b"HTTP/1.1 502 "), reply[:100]
            assert b"127.0.0.1" not in reply
            nursery.cancel_scope.cancel()


async def test_verify_false_accepts_an_unknown_ca(pki: PKI) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(_https_origin, _origin_context(pki, require_client_cert=False))
            )
            service = ServiceConfig(
                "secure",
                Upstream("https", "127.0.0.1", port),
                hosts=("secure",),
                tls=TLSOptions(verify=False),
            )
            reply = await _get_through_proxy(service)
            assert reply.endswith(b"hello anonymous")
            nursery.cancel_scope.cancel()
