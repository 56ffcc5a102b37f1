"""HTTP/1.1 framing, sans-IO: bytes in, events out, and events back to bytes.

How this works: llhttp (through httptools) does the byte-level parsing and is strict by default —
it rejects Content-Length together with Transfer-Encoding, duplicate or non-numeric
Content-Length, chunk-size overflow, obs-fold, bare LF line endings and header names with
spaces or no colon. This module turns its callbacks into h11-style events and adds the rules
llhttp leaves to its caller:

- the head size limit (llhttp has none): enforced while the head is still incomplete, so a client
  cannot make us buffer more than ``max_head_bytes`` plus one ``feed``;
- HTTP/1.0 or 1.1 only (505), exactly one valid ``Host`` on 1.1 (400), no ``CONNECT`` (501), no
  transfer coding but ``chunked`` (501), ``Expect`` other than ``100-continue`` (417);
- absolute-form targets (``GET http://billing/v1 HTTP/1.1``) are accepted as RFC 9112 §3.2.2
  requires of a server: the target's authority replaces ``Host`` and the target becomes
  origin-form, so routing and forwarding see one normal request;
- the target's path is put in canonical form (:mod:`tunneld.proxy.paths`; 400 when it cannot
  be), so routing matches and the origin gets the same path;
- ``Transfer-Encoding`` on an HTTP/1.0 request is refused (400), as RFC 9112 §6.1 allows and
  nginx does, rather than trusting a keep-alive after a body framed in a way 1.0 does not know;
- response framing that depends on the request: an answer to ``HEAD`` has no body (llhttp cannot
  be told through httptools, so that head is cut out and fed alone), and a body without length
  ends when the origin closes (``feed_eof``).

Errors raise :class:`ProtocolError` carrying the status to answer with. Events parsed before an
error in the same data are returned first; the error is then kept in ``error`` for the caller
to raise when it has consumed them (pipelined requests are answered in order).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal

import httptools

from tunneld.errors import ProxyError
from tunneld.proxy.paths import PathError, normalize_target

#: Default bound of a response head from an origin.
MAX_RESPONSE_HEAD_BYTES = 65536

Framing = Literal["none", "length", "chunked", "close"]

# RFC 9110 §7.2 / RFC 3986: reg-name or IP literal, optional port. No spaces, no userinfo.
_HOST_RE = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
_REQUEST_LINE_BYTES = 16  # method separator, " HTTP/1.1", CRLF: what on_url does not count
_HEADER_LINE_BYTES = 4  # ": " and CRLF


class ProtocolError(ProxyError):
    """The peer broke HTTP/1.1; ``status`` is the answer to give (400, 431, 501, 502, ...)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class IncompleteMessage(ProtocolError):
    """The peer closed the connection in the middle of a message."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: bytes
    target: bytes  # origin-form (or "*"), even when the client sent absolute-form; path canonical
    version: bytes  # b"1.0" or b"1.1"
    headers: list[tuple[bytes, bytes]]  # names lower-cased, order kept
    keep_alive: bool
    upgrade: bool  # Connection: upgrade + Upgrade; the parser stops after this head
    expect_continue: bool
    host: bytes  # the authority to route by: Host, or the absolute-form target's
    framing: Framing  # "none", "length" or "chunked"
    content_length: int | None


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool  # the connection may carry another exchange after this one
    framing: Framing
    content_length: int | None


@dataclass(frozen=True, slots=True)
class Body:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    pass


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side between messages."""


Event = RequestHead | ResponseHead | Body | EndOfMessage | ConnectionClosed
END_OF_MESSAGE = EndOfMessage()
CONNECTION_CLOSED = ConnectionClosed()

_IDLE, _HEAD, _BODY, _SWITCHED, _CLOSED = range(5)


class _Parser:
    """What requests and responses share: header collection, head limits, error mapping."""

    _parser: httptools.HttpRequestParser | httptools.HttpResponseParser
    _error_status: int

    def __init__(self, max_head_bytes: int) -> None:
        self._max_head_bytes = max_head_bytes
        self._events: list[Event] = []
        self._state = _IDLE
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # counted from callbacks: exact for complete lines
        self._raw_head_bytes = 0  # whole feeds spent inside one head: a lower bound too
        self._began_in_feed = False
        self._stalled_bytes = 0  # bytes fed in the body state that produced nothing
        self._framing: Framing = "none"
        #: After an upgrade (101 / Upgrade request): the bytes that follow the head.
        self.trailing_data = b""
        #: An error found after the events returned by the last ``feed``; raise it next.
        self.error: ProtocolError | None = None

    @property
    def idle(self) -> bool:
        """Between messages with nothing buffered: the connection may be reused."""
        return self._state == _IDLE and self.error is None

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._state = _HEAD
        self._headers = []
        self._head_bytes = _REQUEST_LINE_BYTES
        self._raw_head_bytes = 0
        self._began_in_feed = True
        self._stalled_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state != _HEAD:
            return  # a trailer: dropped (the byte bound below still applies)
        self._head_bytes += len(name) + len(value) + _HEADER_LINE_BYTES
        if self._head_bytes > self._max_head_bytes:
            raise self._too_large()
        self._headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        self._state = _IDLE
        self._events.append(END_OF_MESSAGE)

    # -- feeding -----------------------------------------------------------------------------

    def _feed(self, data: bytes | bytearray) -> list[Event]:
        if self.error is not None:
            raise self.error
        if self._state == _SWITCHED:
            raise ProtocolError(self._error_status, "data fed after the protocol switched")
        events = self._events = []
        self._began_in_feed = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._state = _SWITCHED
            self.trailing_data = bytes(data[int(exc.args[0]) :])
        except httptools.HttpParserCallbackError as exc:
            context = exc.__context__
            error = (
                context
                if isinstance(context, ProtocolError)
                else ProtocolError(self._error_status, f"malformed message: {exc}")
            )
            return self._fail(error, events)
        except httptools.HttpParserError as exc:
            return self._fail(self._translate(exc), events)
        if self._state == _HEAD:
            if not self._began_in_feed:
                self._raw_head_bytes += len(data)
            if max(self._head_bytes, self._raw_head_bytes) > self._max_head_bytes:
                return self._fail(self._too_large(), events)
        elif self._state == _BODY:
            if events:
                self._stalled_bytes = 0
            else:  # chunk-size lines, extensions or trailers without end
                self._stalled_bytes += len(data)
                if self._stalled_bytes > self._max_head_bytes:
                    return self._fail(
                        ProtocolError(self._error_status, "chunk metadata or trailers too large"),
                        events,
                    )
        return events

    def _fail(self, error: ProtocolError, events: list[Event]) -> list[Event]:
        self._state = _CLOSED
        if not events:
            raise error
        self.error = error
        return events

    def _translate(self, exc: httptools.HttpParserError) -> ProtocolError:
        reason = str(exc)
        if reason in ("Invalid HTTP version", "Pause on PRI/Upgrade"):  # llhttp's words
            return ProtocolError(505, f"unsupported HTTP version: {reason}")
        return ProtocolError(self._error_status, f"malformed message: {reason}")

    def _too_large(self) -> ProtocolError:
        status = 431 if self._error_status == 400 else 502
        return ProtocolError(status, f"message head larger than {self._max_head_bytes} bytes")

    def _body_framing(self) -> tuple[Framing, int | None]:
        """Framing from the headers llhttp has already validated for consistency."""
        length: int | None = None
        codings: list[bytes] = []
        for name, value in self._headers:
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                codings.extend(c.strip().lower() for c in value.split(b","))
        if codings:
            if codings != [b"chunked"]:
                status = 501 if self._error_status == 400 else 502
                raise ProtocolError(status, "only the chunked transfer coding is supported")
            return "chunked", None
        if length is not None:
            return ("length" if length else "none"), length
        return "none", None


class RequestParser(_Parser):
    """Requests from a client, in order (pipelining is just more data)."""

    _error_status = 400

    def __init__(self, max_head_bytes: int) -> None:
        super().__init__(max_head_bytes)
        self._parser = self._requests = httptools.HttpRequestParser(self)
        self._url = b""

    def feed(self, data: bytes | bytearray) -> list[Event]:
        """Parse ``data``; returns the events it completes. Raises :class:`ProtocolError`."""
        return self._feed(data)

    def feed_eof(self) -> list[Event]:
        """The client closed its side. Raises :class:`IncompleteMessage` mid-request."""
        if self._state in (_IDLE, _CLOSED, _SWITCHED):
            self._state = _CLOSED
            return [CONNECTION_CLOSED]
        self._state = _CLOSED
        raise IncompleteMessage(400, "client closed the connection in the middle of a request")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url  # llhttp hands the target over in pieces when it spans feeds
        self._head_bytes += len(url)
        if self._head_bytes > self._max_head_bytes:
            raise self._too_large()

    def on_headers_complete(self) -> None:
        parser = self._requests
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise ProtocolError(505, f"HTTP/{version} is not supported; use HTTP/1.1")
        method = parser.get_method()
        if method == b"CONNECT":
            raise ProtocolError(501, "CONNECT is not supported by this reverse proxy")
        target, host = self._target_and_host(method, version == "1.1")
        upgrade = parser.should_upgrade()
        framing, length = self._body_framing()
        if framing == "chunked" and version == "1.0":
            # RFC 9112 §6.1: the framing is faulty; the connection must close after it (nginx:
            # 400). An HTTP/1.0 origin or peer would not read the chunks as we do.
            raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request; use HTTP/1.1")
        if upgrade and framing != "none":
            raise ProtocolError(400, "an Upgrade request must not carry a body")
        expect_continue = False
        for name, value in self._headers:
            if name == b"expect":
                if value.strip().lower() != b"100-continue":
                    raise ProtocolError(417, "only Expect: 100-continue is supported")
                expect_continue = True
        self._state = _BODY
        self._framing = framing
        self._events.append(
            RequestHead(
                method,
                target,
                b"1.1" if version == "1.1" else b"1.0",
                self._headers,
                parser.should_keep_alive(),
                upgrade,
                expect_continue and framing != "none",
                host,
                framing,
                length,
            )
        )

    def _target_and_host(self, method: bytes, http11: bool) -> tuple[bytes, bytes]:
        hosts = [value for name, value in self._headers if name == b"host"]
        if len(hosts) > 1:
            raise ProtocolError(400, "more than one Host header")
        if http11 and not hosts:
            raise ProtocolError(400, "HTTP/1.1 request without a Host header")
        host = hosts[0].strip() if hosts else b""
        if not _HOST_RE.fullmatch(host):
            raise ProtocolError(400, "invalid Host header")
        target = self._url
        if target.startswith(b"/"):
            return _canonical(target), host
        if target == b"*":
            if method != b"OPTIONS":
                raise ProtocolError(400, "the * target is only valid with OPTIONS")
            return target, host
        # Absolute form: the authority wins over Host (RFC 9112 §3.2.2).
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            raise ProtocolError(400, "invalid request target") from None
        # The stubs say bytes/int; absent parts are None at run time.
        scheme: bytes | None = url.schema
        url_host: bytes | None = url.host
        port: int | None = url.port
        if (scheme or b"").lower() not in (b"http", b"https") or not url_host or url.userinfo:
            raise ProtocolError(400, "request target must be a path or an http(s) URL")
        name = b"[" + url_host + b"]" if b":" in url_host else url_host
        authority = name if port is None else b"%s:%d" % (name, port)
        if not _HOST_RE.fullmatch(authority):
            raise ProtocolError(400, "invalid authority in the request target")
        fragment: bytes | None = url.fragment
        if fragment is not None:
            raise ProtocolError(400, "a '#' in the request target (fragments are not sent)")
        path = _canonical(url.path or b"/")
        if url.query:
            path += b"?" + url.query
        self._headers = [(n, v) for n, v in self._headers if n != b"host"]
        self._headers.append((b"host", authority))
        return path, authority


def _canonical(target: bytes) -> bytes:
    """``target`` with its path in canonical form (:mod:`tunneld.proxy.paths`), else 400."""
    try:
        return normalize_target(target)
    except PathError as exc:
        raise ProtocolError(400, str(exc)) from None


class ResponseParser(_Parser):
    """Responses from an origin. Call :meth:`expect_response` before each request's answer."""

    _error_status = 502

    def __init__(self, max_head_bytes: int = MAX_RESPONSE_HEAD_BYTES) -> None:
        super().__init__(max_head_bytes)
        self._parser = self._responses = httptools.HttpResponseParser(self)
        self._reason = b""
        self._answers_head = False
        self._head_buffer = b""
        self._final_head_seen = False

    def expect_response(self, method: bytes) -> None:
        """The next response answers a ``method`` request (a ``HEAD`` answer has no body)."""
        self._answers_head = method == b"HEAD"
        self._final_head_seen = False

    def feed(self, data: bytes | bytearray) -> list[Event]:
        """Parse ``data``; returns the events it completes. Raises :class:`ProtocolError`."""
        if self._answers_head:
            return self._feed_head_answer(data)
        return self._feed(data)

    def feed_eof(self) -> list[Event]:
        """The origin closed: ends a close-delimited body, else :class:`IncompleteMessage`."""
        state, self._state = self._state, _CLOSED
        if state == _BODY and self._framing == "close":
            return [END_OF_MESSAGE, CONNECTION_CLOSED]
        if state in (_IDLE, _CLOSED, _SWITCHED) and not self._head_buffer:
            return [CONNECTION_CLOSED]
        raise IncompleteMessage(502, "origin closed the connection in the middle of a response")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status
        self._head_bytes += len(status)

    def on_headers_complete(self) -> None:
        parser = self._responses
        status = parser.get_status_code()
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise ProtocolError(502, f"origin answered with HTTP/{version}")
        if status == 101 and not parser.should_upgrade():
            raise ProtocolError(502, "101 response without Upgrade and Connection: upgrade")
        framing, length = self._body_framing()
        if status < 200 or status in (204, 304) or self._answers_head:
            framing = "none"
        elif framing == "none" and length is None:
            framing = "close"  # neither length nor chunked: the body ends at EOF
        self._state = _BODY
        self._framing = framing
        if status >= 200:
            self._final_head_seen = True
        self._events.append(
            ResponseHead(
                status,
                self._reason,
                b"1.1" if version == "1.1" else b"1.0",
                self._headers,
                parser.should_keep_alive() and framing != "close",
                framing,
                length,
            )
        )

    def _feed_head_answer(self, data: bytes | bytearray) -> list[Event]:
        """Answer to HEAD: feed llhttp only the head, end the message ourselves, start afresh."""
        buffer = self._head_buffer + bytes(data)
        events: list[Event] = []
        while buffer:
            end = buffer.find(b"\r\n\r\n")
            if end == -1:
                if len(buffer) > self._max_head_bytes:
                    raise self._too_large()
                break
            head, buffer = buffer[: end + 4], buffer[end + 4 :]
            events.extend(self._feed(head))
            if self._final_head_seen:
                if not events or not isinstance(events[-1], EndOfMessage):
                    events.append(END_OF_MESSAGE)
                # A fresh parser forgets the body the head announced.
                self._parser = self._responses = httptools.HttpResponseParser(self)
                self._state = _IDLE
                self._answers_head = False
                if buffer:  # bytes nobody asked for: the connection must not be reused
                    self.error = ProtocolError(502, "origin sent data after a HEAD response")
                buffer = b""
        self._head_buffer = buffer
        return events

    @property
    def idle(self) -> bool:
        return super().idle and not self._head_buffer


# -- serializing --------------------------------------------------------------------------------

LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"


def request_head_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """An HTTP/1.1 request line and header block (values must come from a parser or be safe)."""
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def response_head_bytes(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """An HTTP/1.1 status line and header block."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body (nothing for empty data, which would end it)."""
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


def error_response_bytes(
    status: int, detail: str, *, close: bool, head_only: bool = False
) -> bytes:
    """A short ``text/plain`` answer of our own (``head_only``: the answer to a HEAD)."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}\n{detail}\n" if detail else f"{status} {phrase}\n"
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        (b"x-content-type-options", b"nosniff"),
    ]
    if close:
        headers.append((b"connection", b"close"))
    head = response_head_bytes(status, phrase.encode("ascii"), headers)
    return head if head_only else head + body.encode()


def printable(value: bytes, limit: int = 200) -> str:
    """``value`` quoted for a message, with anything but plain printable ASCII escaped."""
    text = value[:limit].decode("latin-1")
    safe = "".join(
        c if " " < c < "\x7f" and c not in "\"'<>&\\" else f"\\x{ord(c):02x}" for c in text
    )
    return f"'{safe}'" if safe else "(none)"
