"""HTTP/1.1 framing (sans-IO): events, limits and every malformed input the proxy must survive."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunneld.proxy.http1 import (
    CONNECTION_CLOSED,
    END_OF_MESSAGE,
    Body,
    EndOfMessage,
    Event,
    IncompleteMessage,
    ProtocolError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    chunk,
    request_head_bytes,
    response_head_bytes,
)

LIMIT = 8192


def feed_all(parser: RequestParser | ResponseParser, *pieces: bytes) -> list[Event]:
    events: list[Event] = []
    for piece in pieces:
        events += parser.feed(piece)
    return events


def request(data: bytes) -> list[Event]:
    return RequestParser(LIMIT).feed(data)


def head_of(events: list[Event]) -> RequestHead:
    head = events[0]
    assert isinstance(head, RequestHead)
    return head


def body_of(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Body))


def status_of(data: bytes | list[bytes], *, limit: int = LIMIT) -> int:
    parser = RequestParser(limit)
    pieces = [data] if isinstance(data, bytes) else data
    with pytest.raises(ProtocolError) as caught:
        for piece in pieces:
            parser.feed(piece)
        if parser.error is not None:
            raise parser.error
    return caught.value.status


# -- requests: well-formed ----------------------------------------------------------------------


def test_simple_get() -> None:
    events = request(b"GET /v1/x?q=1 HTTP/1.1\r\nHost: Billing:80\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    head = head_of(events)
    assert head.method == b"GET"
    assert head.target == b"/v1/x?q=1"
    assert head.version == b"1.1"
    assert head.host == b"Billing:80"
    assert head.headers == [(b"host", b"Billing:80"), (b"x-a", b"1"), (b"x-a", b"2")]
    assert head.keep_alive and not head.upgrade and not head.expect_continue
    assert head.framing == "none"
    assert events[1:] == [END_OF_MESSAGE]


def test_content_length_body_in_pieces() -> None:
    parser = RequestParser(LIMIT)
    events = feed_all(
        parser, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n012", b"3456", b"789"
    )
    head = head_of(events)
    assert (head.framing, head.content_length) == ("length", 10)
    assert body_of(events) == b"0123456789"
    assert isinstance(events[-1], EndOfMessage)
    assert parser.idle


def test_chunked_body_with_extension_and_trailer() -> None:
    events = request(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: dropped\r\n\r\n"
    )
    head = head_of(events)
    assert head.framing == "chunked"
    assert body_of(events) == b"abcde"
    assert (b"x-trailer", b"dropped") not in head.headers
    assert events[-1] == END_OF_MESSAGE


def test_pipelined_requests_come_out_in_order() -> None:
    events = request(
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
        b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    targets = [e.target for e in events if isinstance(e, RequestHead)]
    assert targets == [b"/1", b"/2", b"/3"]
    assert body_of(events) == b"hi"
    assert sum(isinstance(e, EndOfMessage) for e in events) == 3


def test_good_requests_before_garbage_are_delivered_then_the_error() -> None:
    parser = RequestParser(LIMIT)
    events = parser.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGARBAGE\r\n\r\n")
    assert head_of(events).target == b"/1"
    assert parser.error is not None and parser.error.status == 400
    assert not parser.idle
    with pytest.raises(ProtocolError):
        parser.feed(b"")


PIPELINE = (
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
    b"POST /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    b"PUT /3 HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\n\r\nxyz"
)


@given(st.lists(st.integers(min_value=1, max_value=len(PIPELINE) - 1), max_size=30))
def test_any_split_of_the_input_gives_the_same_requests(cuts: list[int]) -> None:
    points = [0, *sorted(set(cuts)), len(PIPELINE)]
    pieces = [PIPELINE[a:b] for a, b in itertools.pairwise(points)]
    events = feed_all(RequestParser(LIMIT), *pieces)
    heads = [(e.method, e.target, e.host) for e in events if isinstance(e, RequestHead)]
    assert heads == [(b"GET", b"/1", b"a"), (b"POST", b"/2", b"a"), (b"PUT", b"/3", b"b")]
    assert body_of(events) == b"helloxyz"
    assert sum(isinstance(e, EndOfMessage) for e in events) == 3


def test_http10_without_host_and_keep_alive_rules() -> None:
    head = head_of(request(b"GET / HTTP/1.0\r\n\r\n"))
    assert (head.version, head.host, head.keep_alive) == (b"1.0", b"", False)
    head = head_of(request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"))
    assert head.keep_alive
    head = head_of(request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    assert not head.keep_alive


def test_absolute_form_routes_by_its_authority() -> None:
    head = head_of(request(b"GET http://Billing:8080/v1/x?q=1 HTTP/1.1\r\nHost: other\r\n\r\n"))
    assert head.target == b"/v1/x?q=1"
    assert head.host == b"Billing:8080"
    assert [v for n, v in head.headers if n == b"host"] == [b"Billing:8080"]
    head = head_of(request(b"GET http://[fd44::1]/ HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert (head.host, head.target) == (b"[fd44::1]", b"/")
    head = head_of(request(b"GET https://api HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert (head.host, head.target) == (b"api", b"/")


def test_options_asterisk() -> None:
    assert head_of(request(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")).target == b"*"


def test_upgrade_hands_back_the_bytes_after_the_head() -> None:
    parser = RequestParser(LIMIT)
    events = parser.feed(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00"
    )
    assert head_of(events).upgrade
    assert events[1:] == [END_OF_MESSAGE]
    assert parser.trailing_data == b"\x81\x00"
    with pytest.raises(ProtocolError):
        parser.feed(b"more")


def test_expect_continue() -> None:
    head = head_of(
        request(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n")
    )
    assert head.expect_continue
    # Without a body there is nothing to wait for.
    head = head_of(request(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n"))
    assert not head.expect_continue


def test_eof_between_and_inside_requests() -> None:
    parser = RequestParser(LIMIT)
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert parser.feed_eof() == [CONNECTION_CLOSED]
    parser = RequestParser(LIMIT)
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab")
    with pytest.raises(IncompleteMessage):
        parser.feed_eof()


def test_head_just_under_the_limit_passes() -> None:
    filler = b"x" * (LIMIT - 200)
    head = head_of(request(b"GET / HTTP/1.1\r\nHost: a\r\nX-Fill: " + filler + b"\r\n\r\n"))
    assert (b"x-fill", filler) in head.headers


# -- requests: bad input --------------------------------------------------------------------------

BAD_REQUESTS = {
    "request line garbage": (b"GARBAGE\r\n\r\n", 400),
    "TLS client hello": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400),
    "lower-case method": (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "junk after version": (b"GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n", 400),
    "space in target": (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "control char in target": (b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "header without colon": (b"GET / HTTP/1.1\r\nHost: a\r\nBadHeader\r\n\r\n", 400),
    "space before colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
    "bare LF": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "control char in value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n", 400),
    "Content-Length with Transfer-Encoding": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    "Transfer-Encoding with Content-Length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        400,
    ),
    "negative Content-Length": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\n", 400),
    "huge Content-Length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        400,
    ),
    "list Content-Length": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", 400),
    "duplicate Content-Length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        400,
    ),
    "chunk size overflow": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"fffffffffffffffffffffff\r\n",
        400,
    ),
    "chunk size not hex": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
    ),
    "chunked not last": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        400,
    ),
    "unknown transfer coding": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
    ),
    "unsupported transfer coding before chunked": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        501,
    ),
    "Host missing": (b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400),
    "two Host headers": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "Host with spaces": (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    "Host with a slash": (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    "Host with userinfo": (b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
    "absolute-form, not http": (b"GET ftp://a/b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "absolute-form with userinfo": (b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "asterisk without OPTIONS": (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "CONNECT": (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
    "HTTP/2.0 request line": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "HTTP/0.9": (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505),
    "HTTP/1.2": (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "Expect other than 100-continue": (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: xyz\r\n\r\n", 417),
    "Upgrade with a body": (
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        400,
    ),
    "100 KB header": (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 100_000 + b"\r\n\r\n", 431),
    "many headers": (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 2000 + b"\r\n", 431),
    "huge target": (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 431),
    "encoded slash in the path": (b"GET /admin%2fx HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "encoded NUL in the path": (b"GET /a%00 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "invalid escape in the path": (b"GET /a%zz HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "backslash in the path": (b"GET /a\\b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "fragment in the target": (b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "fragment in an absolute-form target": (b"GET http://a/b#c HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "HTTP/1.0 with Transfer-Encoding": (
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.0\r\n\r\n",
        400,
    ),
}


@pytest.mark.parametrize(("data", "status"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request(data: bytes, status: int) -> None:
    assert status_of(data) == status


@pytest.mark.parametrize(("data", "status"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_one_byte_at_a_time(data: bytes, status: int) -> None:
    data = data[:20_000]  # enough to trip the head limit without a slow test
    if status == 431:
        data += b"x" * LIMIT  # still no end of head in sight
    assert status_of([data[i : i + 1] for i in range(len(data))]) == status


def test_trickled_header_fails_once_past_the_limit_not_at_its_end() -> None:
    parser = RequestParser(LIMIT)
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
    fed = 0
    with pytest.raises(ProtocolError) as caught:
        while fed < 10 * LIMIT:
            parser.feed(b"x" * 512)
            fed += 512
    assert caught.value.status == 431
    assert fed <= LIMIT


def test_endless_trailer_is_bounded() -> None:
    parser = RequestParser(LIMIT)
    parser.feed(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX: "
    )
    with pytest.raises(ProtocolError):
        for _ in range(100):
            parser.feed(b"y" * 1024)


# -- responses ---------------------------------------------------------------------------------


def response(data: bytes, method: bytes = b"GET") -> tuple[ResponseParser, list[Event]]:
    parser = ResponseParser()
    parser.expect_response(method)
    return parser, parser.feed(data)


def test_response_with_length() -> None:
    parser, events = response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX: y\r\n\r\nabc")
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert (head.status, head.reason, head.framing, head.keep_alive) == (200, b"OK", "length", True)
    assert head.headers == [(b"content-length", b"3"), (b"x", b"y")]
    assert body_of(events) == b"abc"
    assert events[-1] == END_OF_MESSAGE
    assert parser.idle


def test_response_chunked() -> None:
    _, events = response(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    assert isinstance(events[0], ResponseHead) and events[0].framing == "chunked"
    assert body_of(events) == b"abc"
    assert events[-1] == END_OF_MESSAGE


def test_response_delimited_by_close() -> None:
    parser, events = response(b"HTTP/1.1 200 OK\r\n\r\nabc")
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert (head.framing, head.keep_alive) == ("close", False)
    events += parser.feed(b"def")
    assert body_of(events) == b"abcdef"
    assert parser.feed_eof() == [END_OF_MESSAGE, CONNECTION_CLOSED]


def test_response_cut_short_is_incomplete() -> None:
    parser, _ = response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(IncompleteMessage) as caught:
        parser.feed_eof()
    assert caught.value.status == 502
    parser, _ = response(b"HTTP/1.1 200 OK\r\nContent-")
    with pytest.raises(IncompleteMessage):
        parser.feed_eof()


def test_clean_close_between_responses() -> None:
    parser, _ = response(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert parser.feed_eof() == [CONNECTION_CLOSED]


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses_ignore_content_length(status: int) -> None:
    parser, events = response(b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status)
    assert isinstance(events[0], ResponseHead) and events[0].framing == "none"
    assert events[1:] == [END_OF_MESSAGE]
    assert parser.idle


def test_head_answer_has_no_body_and_the_parser_continues() -> None:
    parser = ResponseParser()
    parser.expect_response(b"HEAD")
    events = feed_all(parser, b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 1000\r\n\r\n")
    head = events[0]
    assert isinstance(head, ResponseHead) and head.framing == "none" and head.keep_alive
    assert events[1:] == [END_OF_MESSAGE]
    assert parser.idle
    parser.expect_response(b"GET")
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert body_of(events) == b"ok"


def test_head_answer_after_an_informational_response() -> None:
    parser = ResponseParser()
    parser.expect_response(b"HEAD")
    events = parser.feed(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    statuses = [e.status for e in events if isinstance(e, ResponseHead)]
    assert statuses == [100, 200]
    assert events[-1] == END_OF_MESSAGE
    assert parser.idle


def test_head_answer_followed_by_junk_poisons_the_connection() -> None:
    parser = ResponseParser()
    parser.expect_response(b"HEAD")
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert events[-1] == END_OF_MESSAGE
    assert not parser.idle


def test_informational_then_final() -> None:
    _, events = response(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    )
    statuses = [e.status for e in events if isinstance(e, ResponseHead)]
    assert statuses == [100, 201]


def test_switching_protocols_hands_back_the_rest() -> None:
    parser, events = response(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"\x81\x02hi"
    )
    assert isinstance(events[0], ResponseHead) and events[0].status == 101
    assert parser.trailing_data == b"\x81\x02hi"


def test_connection_close_response_is_not_reusable() -> None:
    _, events = response(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(events[0], ResponseHead) and not events[0].keep_alive
    _, events = response(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(events[0], ResponseHead) and not events[0].keep_alive


BAD_RESPONSES = {
    "garbage": b"garbage\r\n\r\n",
    "status out of range": b"HTTP/1.1 2000 OK\r\n\r\n",
    "HTTP/2.0": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "length and chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    ),
    "unknown transfer coding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "101 without Upgrade": b"HTTP/1.1 101 Switching\r\n\r\n",
    "huge head": b"HTTP/1.1 200 OK\r\nX: " + b"y" * 100_000 + b"\r\n\r\n",
}


@pytest.mark.parametrize("data", BAD_RESPONSES.values(), ids=BAD_RESPONSES.keys())
def test_bad_response_is_a_502(data: bytes) -> None:
    parser = ResponseParser()
    parser.expect_response(b"GET")
    with pytest.raises(ProtocolError) as caught:
        parser.feed(data)
    assert caught.value.status == 502


def test_bad_head_answer_is_a_502() -> None:
    parser = ResponseParser()
    parser.expect_response(b"HEAD")
    with pytest.raises(ProtocolError) as caught:
        parser.feed(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 100_000)
    assert caught.value.status == 502


# -- serializing --------------------------------------------------------------------------------


def test_request_head_round_trips() -> None:
    data = request_head_bytes(b"POST", b"/x", [(b"host", b"a"), (b"content-length", b"2")])
    assert data == b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n"
    head = head_of(request(data + b"hi"))
    assert (head.method, head.target, head.content_length) == (b"POST", b"/x", 2)


def test_response_head_and_chunks_round_trip() -> None:
    data = response_head_bytes(200, b"OK", [(b"transfer-encoding", b"chunked")])
    data += chunk(b"hello") + chunk(b"x" * 300) + b"0\r\n\r\n"
    _, events = response(data)
    assert body_of(events) == b"hello" + b"x" * 300
    assert isinstance(events[-1], EndOfMessage)


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/../admin",
        b"/v1/%2e%2e/admin",
        b"/v1/%2E./admin",
        b"/./x",
        b"http://billing/v1/../admin",
        b"/v1/..%2fadmin",
        b"/v1/%2e%2e%2fadmin",
        b"http://billing/v1/%2e%2e/admin",
    ],
)
def test_dot_segments_cannot_escape_a_path_prefix(target: bytes) -> None:
    parser = RequestParser(max_head_bytes=65536)
    with pytest.raises(ProtocolError) as caught:
        parser.feed(b"GET " + target + b" HTTP/1.1\r\nHost: billing\r\n\r\n")
    assert caught.value.status == 400


def test_dots_inside_names_are_fine() -> None:
    parser = RequestParser(max_head_bytes=65536)
    events = parser.feed(b"GET /v1/file..txt/.well-known HTTP/1.1\r\nHost: billing\r\n\r\n")
    assert events[0].target == b"/v1/file..txt/.well-known"  # type: ignore[attr-defined]


def test_targets_come_out_canonical_and_keep_their_query() -> None:
    head = head_of(request(b"GET /%61dmin//x/%7e?q=%2f//.. HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert head.target == b"/admin/x/~?q=%2f//.."
    head = head_of(request(b"GET http://a//%61%c3%a9?x=%61 HTTP/1.1\r\nHost: b\r\n\r\n"))
    assert (head.host, head.target) == (b"a", b"/a%C3%A9?x=%61")


def test_http10_chunked_request_is_refused_and_nothing_after_it_is_read() -> None:
    """RFC 9112 §6.1: no keep-alive after it; a pipelined request must not be forwarded."""
    parser = RequestParser(LIMIT)
    with pytest.raises(ProtocolError) as caught:
        parser.feed(
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
            b"0\r\n\r\nGET /smuggled HTTP/1.0\r\n\r\n"
        )
    assert caught.value.status == 400
    with pytest.raises(ProtocolError):
        parser.feed(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
