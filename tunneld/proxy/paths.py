"""Request paths in one canonical form, so that a rule matches what the origin will serve. Pure.

Why: rules match path prefixes, and origins decode. A guard on ``/admin`` is worthless if
``/%61dmin``, ``//admin`` or ``/x/..%2fadmin`` reach the origin unmatched: the origin decodes
them to ``/admin``. So the path is put in one form first, and that form is both what the rules
match and what the origin gets. The rules, after nginx (``ngx_http_parse_complex_uri``,
``merge_slashes on``) and Envoy (``normalize_path``, ``merge_slashes``,
``path_with_escaped_slashes_action``), stricter where a choice had to be made:

- percent-escapes of unreserved characters (``A-Z a-z 0-9 - . _ ~``) are decoded; every other
  escape is kept, its hex in upper case (``%c3%a9`` → ``%C3%A9``). A ``%`` without two hex
  digits after it is refused;
- refused (400): escapes of control characters and NUL (``%00`` to ``%1F``, ``%7F``), an encoded
  ``/`` or ``\\`` (``%2F``, ``%5C``) and a raw ``\\``: origins disagree on what they mean (a
  second separator, or part of a name), and a proxy cannot guess which one is behind it;
- runs of ``/`` are merged into one, as nginx does; the merged path is the one forwarded;
- ``.`` and ``..`` segments — also spelled ``%2e`` — are refused rather than resolved: clients
  resolve them before sending (RFC 3986 §5.2), so only probes carry them, and refusing leaves no
  doubt about what the origin will resolve them to;
- ``#`` is refused: a fragment is never sent, and origins cut the path at it where rules do not;
- the query (from the first ``?``) is left byte for byte as it came.

:func:`without_parameters` serves a check the router makes on paths with ``;``: Java servlet
containers cut ``;parameters`` off each segment (``/admin;x/secret`` is ``/admin/secret`` to
Tomcat), so such a path must match the same rule both ways.

Cost: a path with no ``%``, ``//``, ``/.``, ``\\`` or ``#`` is already canonical, and
:func:`normalize_target` returns it as it is after a few ``find`` calls, allocating nothing.
"""

from __future__ import annotations

import re

from tunneld.errors import ProxyError


class PathError(ProxyError):
    """The request path cannot be put in canonical form; the answer is 400."""

    status = 400


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_REFUSED = {0x2F: "an encoded '/' (%2F)", 0x5C: "an encoded '\\' (%5C)"}


def _escape_table() -> dict[bytes, bytes | str]:
    """Every two-hex-digit code (any case) → its replacement bytes, or why it is refused."""
    digits = "0123456789abcdefABCDEF"
    table: dict[bytes, bytes | str] = {}
    for high in digits:
        for low in digits:
            code = (high + low).encode("ascii")
            value = int(code, 16)
            if value in _REFUSED:
                table[code] = _REFUSED[value]
            elif value < 0x20 or value == 0x7F:
                table[code] = f"an encoded control character (%{value:02X})"
            elif value in _UNRESERVED:
                table[code] = bytes((value,))
            else:
                table[code] = b"%" + code.upper()
    return table


_ESCAPES = _escape_table()
_SLASHES = re.compile(rb"//+")
# Bytes as ints: ``37 in target`` costs a tenth of ``b"%" in target`` (no buffer protocol).
_PERCENT, _HASH, _BACKSLASH, _DOT = b"%#\\."
_TEXT_SLASHES = re.compile(r"//+")
# Servlet containers cut at a raw ';'; an encoded one is cut too, in case an origin decodes first.
_PARAMETERS = re.compile(r"(;|%3B).*")


def normalize_target(target: bytes) -> bytes:
    """An origin-form target (``/path?query``) with its path canonical; raises :class:`PathError`.

    The same object comes back when the path is already canonical, so a caller can tell with
    ``is`` whether anything changed. ``*`` (of ``OPTIONS *``) is returned as it is.
    """
    if (  # the common case: nothing to do, and nothing allocated to find that out
        _PERCENT not in target
        and _HASH not in target
        and _BACKSLASH not in target
        and (_DOT not in target or target.find(b"/.") < 0)
        and target.find(b"//") < 0
    ):
        return target
    if b"#" in target:
        raise PathError("a '#' in the request target (fragments are not sent to servers)")
    end = target.find(b"?")
    if end < 0:
        end = len(target)
    if (  # what made the first check fail is in the query, which stays as it is
        target.find(b"%", 0, end) < 0
        and target.find(b"//", 0, end) < 0
        and target.find(b"/.", 0, end) < 0
        and target.find(b"\\", 0, end) < 0
    ):
        return target
    path = normalize_path(target[:end])
    if end == len(target):
        return target if path == target else path
    normal = path + target[end:]
    return target if normal == target else normal


def normalize_path(path: bytes) -> bytes:
    """The canonical form of ``path`` (no query) by the rules of the module docstring."""
    if b"\\" in path:
        raise PathError("a '\\' in the request path")
    if b"%" in path:
        pieces = path.split(b"%")
        out = [pieces[0]]
        for piece in pieces[1:]:
            replacement = _ESCAPES.get(piece[:2])
            if replacement is None:
                raise PathError("a '%' not followed by two hex digits in the request path")
            if isinstance(replacement, str):
                raise PathError(f"{replacement} in the request path")
            out += (replacement, piece[2:])
        path = b"".join(out)
    if b"//" in path:
        path = _SLASHES.sub(b"/", path)
    if b"/." in path and any(segment in (b".", b"..") for segment in path.split(b"/")):
        raise PathError("a '.' or '..' segment in the request path")
    return path


def without_parameters(path: str) -> str:
    """``path`` (canonical, no query) as a servlet container reads it: ``;…`` cut off each segment.

    ``/admin;x/secret`` → ``/admin/secret``; ``/a/..;/b`` raises :class:`PathError`, because
    ``..;`` is ``..`` to such an origin. An encoded ``;`` (``%3B``) cuts too, in case an origin
    decodes before it cuts. Runs of ``/`` left behind (``/;x/a``) are merged.
    """
    path = "/".join(_PARAMETERS.sub("", segment) for segment in path.split("/"))
    if "//" in path:
        path = _TEXT_SLASHES.sub("/", path)
    if any(segment in (".", "..") for segment in path.split("/")):
        raise PathError("a '.' or '..' segment before a ';' in the request path")
    return path


def prefix_problem(prefix: str) -> str | None:
    """What stops ``prefix`` (a configured ``path_prefix``) from ever matching, or ``None``.

    A prefix is compared with canonical paths, so it must be canonical itself, and it must not
    contain ``;`` (a path with one must match the same rule with it cut off).
    """
    if ";" in prefix or "%3B" in prefix:
        return "';' cannot be matched: paths with ';' must match the same rule without it"
    try:
        normal = normalize_path(prefix.encode("ascii")).decode("ascii")
    except PathError as exc:
        return str(exc).replace("request path", "prefix")
    if normal != prefix:
        return f"requests are matched in canonical form; write it as {normal!r}"
    return None
