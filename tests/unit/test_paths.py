"""Tests of tunneld.proxy.paths: the canonical form rules match and origins get."""

from __future__ import annotations

import posixpath
import re
import urllib.parse

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tunneld.proxy.paths import (
    PathError,
    normalize_path,
    normalize_target,
    prefix_problem,
    without_parameters,
)
from tunneld.proxy.routes import path_matches

CANONICAL = {
    b"/%61dmin/secret.txt": b"/admin/secret.txt",
    b"/%41%42%43/%7a%30%2D%2e%5F%7E": b"/ABC/z0-._~",
    b"//admin/secret.txt": b"/admin/secret.txt",
    b"/a///b//": b"/a/b/",
    b"/a%c3%a9": b"/a%C3%A9",
    b"/a%3f%23%25%20%2b": b"/a%3F%23%25%20%2B",
    b"/v1/%2e%2e.": b"/v1/...",
    b"/v1/%2efoo": b"/v1/.foo",
    b"/%2e%2e%2e": b"/...",
    b"/.well-known/x": b"/.well-known/x",
    b"/a?b=1&c=%zz//..": b"/a?b=1&c=%zz//..",  # the query is left as it came
    b"/x%3Bjsessionid": b"/x%3Bjsessionid",
    b"/a;b=c/d": b"/a;b=c/d",
}


@pytest.mark.parametrize(("target", "canonical"), CANONICAL.items())
def test_canonical_forms(target: bytes, canonical: bytes) -> None:
    assert normalize_target(target) == canonical


REFUSED = {
    b"/admin%2fsecret.txt": "an encoded '/' (%2F)",
    b"/admin%2Fsecret.txt": "an encoded '/' (%2F)",
    b"/x/..%2fadmin": "an encoded '/' (%2F)",
    b"/v1/%2e%2e%2fadmin": "an encoded '/' (%2F)",
    b"/a%5cb": "an encoded '\\' (%5C)",
    b"/a\\b": "a '\\'",
    b"/x/../admin": "a '.' or '..' segment",
    b"/x/%2e%2e/admin": "a '.' or '..' segment",
    b"/x/%2E./admin": "a '.' or '..' segment",
    b"/./x": "a '.' or '..' segment",
    b"/x/.": "a '.' or '..' segment",
    b"/x/..": "a '.' or '..' segment",
    b"/x//..//y": "a '.' or '..' segment",
    b"/%zz": "a '%' not followed by two hex digits",
    b"/%4": "a '%' not followed by two hex digits",
    b"/a%": "a '%' not followed by two hex digits",
    b"/%%41": "a '%' not followed by two hex digits",
    b"/%+1": "a '%' not followed by two hex digits",
    b"/%00": "an encoded control character (%00)",
    b"/a%0d%0aX:%20y": "an encoded control character (%0D)",
    b"/%7f": "an encoded control character (%7F)",
    b"/%1F": "an encoded control character (%1F)",
    b"/a#b": "a '#'",
    b"/a?q#b": "a '#'",
}


@pytest.mark.parametrize(("target", "reason"), REFUSED.items())
def test_refused(target: bytes, reason: str) -> None:
    with pytest.raises(PathError) as caught:
        normalize_target(target)
    assert reason in str(caught.value)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "target", [b"/", b"/v1/x", b"/a.b/c..d/e.", b"/a;b", b"/x?y=%zz//../", b"*", b"/~a-b_c"]
)
def test_a_canonical_target_comes_back_as_the_same_object(target: bytes) -> None:
    assert normalize_target(target) is target


def test_byte_identical_after_the_slow_path_is_the_original_object() -> None:
    target = b"/a%2B?q=%2f"
    assert normalize_target(target) is target


def test_without_parameters() -> None:
    assert without_parameters("/admin;x/secret") == "/admin/secret"
    assert without_parameters("/a;b=c;d/e;") == "/a/e"
    assert without_parameters("/;x/admin") == "/admin"
    assert without_parameters("/plain") == "/plain"
    assert without_parameters("/admin%3Bx/y") == "/admin/y"
    for path in ("/a/..;/b", "/a/.;x/b", "/..;"):
        with pytest.raises(PathError):
            without_parameters(path)


@pytest.mark.parametrize(
    ("prefix", "problem"),
    [
        ("/v1", None),
        ("/", None),
        ("/a%C3%A9", None),
        ("/%61", "write it as '/a'"),
        ("/a%c3%a9", "write it as '/a%C3%A9'"),
        ("/a//b", "write it as '/a/b'"),
        ("/a%2Fb", "an encoded '/' (%2F) in the prefix"),
        ("/a;b", "';' cannot be matched"),
        ("/a%3Bb", "';' cannot be matched"),
        ("/%zz", "a '%' not followed by two hex digits in the prefix"),
    ],
)
def test_prefix_problem(prefix: str, problem: str | None) -> None:
    found = prefix_problem(prefix)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


# --- properties -----------------------------------------------------------------------------

PIECES = [
    "/", "//", "a", "admin", "v1", "x.y", ".", "..", "...", "%2e", "%2E", "%2f", "%2F", "%5c",
    "%61", "%41", "%64min", "%7e", "%7E", "%25", "%252e", "%3f", "%3F", "%c3%a9", "%00", "%1f",
    "%zz", "%4", "%", ";", ";x=1", "~", "-", "_", "\\", "#", "%23", "%20", "+", ":", "@",
]  # fmt: skip
targets = st.lists(st.sampled_from(PIECES), max_size=12).map(lambda p: ("/" + "".join(p)).encode())
queries = st.sampled_from([b"", b"?", b"?a=%2f&b=//..", b"?x=%zz"])
prefixes = st.sampled_from(["/", "/admin", "/v1", "/a", "/x.y", "/admin/v1", "/%C3%A9"])


def origin_view(path: bytes) -> str:
    """The path a decoding origin (Python's http.server, most frameworks) resolves."""
    decoded = urllib.parse.unquote_to_bytes(path).decode("latin-1")
    return posixpath.normpath(decoded) if decoded else "/"


def accepted(target: bytes) -> bytes | None:
    try:
        return normalize_target(target)
    except PathError:
        return None


@given(targets, queries)
@example(b"/%2e%2e%2e", b"")
def test_canonical_form_is_stable_and_keeps_the_query(path: bytes, query: bytes) -> None:
    normal = accepted(path + query)
    if normal is not None:
        assert normalize_target(normal) == normal
        assert normal.endswith(query)
        assert normal.startswith(b"/")


@given(targets)
def test_canonical_form_has_only_canonical_parts(path: bytes) -> None:
    normal = accepted(path)
    if normal is None:
        return
    assert b"//" not in normal and b"\\" not in normal and b"#" not in normal
    assert not {b".", b".."} & set(normal.split(b"/"))
    for escape in re.findall(rb"%(..)", normal):
        value = int(escape, 16)
        assert escape == escape.upper()
        assert value >= 0x20 and value not in (0x2F, 0x5C, 0x7F)
        assert not (chr(value).isalnum() and value < 0x80) and chr(value) not in "-._~"


@given(targets)
def test_the_origin_reads_the_same_path_from_both_forms(path: bytes) -> None:
    normal = accepted(path)
    if normal is not None:
        merged = re.sub(rb"//+", b"/", urllib.parse.unquote_to_bytes(path))
        assert urllib.parse.unquote_to_bytes(normal) == merged


@given(targets, prefixes)
def test_a_rule_matches_exactly_what_a_decoding_origin_puts_under_it(
    path: bytes, prefix: str
) -> None:
    """The safety property: no spelling reaches under a prefix without matching it, or back."""
    normal = accepted(path)
    if normal is not None:
        view = origin_view(path)
        assert path_matches(prefix, normal.decode("latin-1")) == path_matches(prefix, view), view


@given(st.binary(max_size=40).map(lambda b: b"/" + b))
def test_arbitrary_bytes_are_canonical_or_refused_never_an_other_error(path: bytes) -> None:
    try:
        normal = normalize_path(path)
    except PathError:
        return
    assert normalize_path(normal) == normal
