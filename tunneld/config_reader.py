"""Reading a TOML config file and its tables, recording problems instead of raising.

``config.py`` validates a whole configuration in one pass and reports every problem at once, so
the reads here never raise: ``Table`` converts a value to the type the caller asks for, records
what is wrong in the shared ``Context``, and returns a fallback so that validation goes on.
Nothing here knows which sections or keys tunneld has.

The typed reads are ``Table``'s methods: strings, integers, booleans, durations in seconds,
file paths (``file_path`` resolves relative ones), lists of strings, and sub-tables. A value that
came from an environment variable is still the variable's string (``Context`` remembers which
variable set which key path); the typed reads parse it: comma-separated lists, decimal or 0x-hex
integers, true/false/1/0, seconds as decimals. A problem is reported against the variable when
one set the value, else against the key path in the file.

``toml_value`` and ``toml_lines`` write values back as TOML that these reads accept, for
``render_config``; ``quote`` writes a whole string. A message quotes a value with ``shown``
instead: escaped and bounded to ``MAX_SHOWN_CHARS``, so that a 900 KB value, a newline or an
escape sequence cannot flood the log, forge a second problem line or reach the terminal.

Only the file itself is fatal at once (``read_toml_file`` raises ``ConfigError``): without it
there is nothing to validate. It must be a regular file of at most ``MAX_FILE_BYTES``, so that a
FIFO or a device given by mistake is refused at once instead of hanging or filling memory.
"""

# ruff: noqa: RUF001 -- messages write ranges with an en dash (U+2013) on purpose

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tunneld.errors import ConfigError

#: Where a value sits in the document: ``("gateway", 0, "endpoints", 1)``.
KeyPath = tuple[str | int, ...]

#: A config file is a few kilobytes; anything this large is the wrong file.
MAX_FILE_BYTES = 1 << 20
#: Linux's PATH_MAX, which counts the terminating NUL: a longer path fails with ENAMETOOLONG.
PATH_MAX_BYTES = 4096
#: The longest duration ``Table.seconds`` accepts: bounds typos such as milliseconds as seconds.
MAX_SECONDS = 365 * 86400

_ENV_INT_RE = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
_ENV_SECONDS_RE = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")
_ENV_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}

#: How much of a value a message quotes (``shown``); the rest is only counted. Every value that
#: could be valid (a DNS name has 253 characters at most) is shown whole.
MAX_SHOWN_CHARS = 256
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_BARE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
#: More digits than any integer setting needs; ``int()`` refuses more than 4300.
_MAX_ENV_INT_CHARS = 32

_FILE_TYPES = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


# --- the file -------------------------------------------------------------------------------


def read_toml_file(path: Path, label: str, *, required: bool = True) -> dict[str, object] | None:
    """The parsed file; None if it does not exist and is not ``required``.

    Every failure is a ``ConfigError`` whose message starts with ``label``.
    """
    try:
        content = _read_regular_file(path, label)
    except FileNotFoundError:
        if not required:
            return None
        raise ConfigError(f"{label}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not UTF-8 text (byte {exc.start}); TOML is UTF-8") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: invalid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{label}: invalid TOML: nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{label}: invalid TOML: {exc}") from exc


def _read_regular_file(path: Path, label: str) -> bytes:
    """The content of ``path``, which must be a regular file of ``MAX_FILE_BYTES`` at most.

    Raises ``ConfigError`` for any other file, ``OSError`` if it cannot be opened or read.
    """
    # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below. Reads from a
    # regular file ignore the flag.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)  # of the file we read, not of whatever the name points at by now
        if not stat.S_ISREG(info.st_mode):
            kind = _FILE_TYPES.get(stat.S_IFMT(info.st_mode), "a special file")
            raise ConfigError(f"{label}: {kind}, not a regular file; point it at the TOML file")
        too_large = (
            f"{label}: larger than {MAX_FILE_BYTES} bytes; a config file is a few "
            "kilobytes: check the path"
        )
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(too_large)
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, MAX_FILE_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_FILE_BYTES:  # it grew after fstat
                raise ConfigError(too_large)
        return b"".join(chunks)
    finally:
        os.close(fd)


# --- messages -------------------------------------------------------------------------------


def quote(text: str) -> str:
    """``text`` as a TOML basic string, whole: for rendered TOML. Messages use ``shown``."""
    # JSON's escapes are all valid in TOML; TOML also wants DEL escaped, JSON leaves it raw.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def shown(text: str) -> str:
    """``text`` as a message quotes a value: a TOML basic string of at most its first
    ``MAX_SHOWN_CHARS`` characters, then ``… (N bytes)`` if it was longer.

    Every character that is not printable (controls, line and paragraph separators, bidi
    overrides, lone surrogates from undecodable environment bytes) is escaped, so a message is
    one line that a terminal shows as written and that no value can forge a second problem in.
    """
    escaped = "".join(_ESCAPES.get(char) or _escape(char) for char in text[:MAX_SHOWN_CHARS])
    if len(text) <= MAX_SHOWN_CHARS:
        return f'"{escaped}"'
    size = len(text.encode("utf-8", "surrogatepass"))
    return f'"{escaped}"… ({size} bytes)'


def shown_name(name: str) -> str:
    """A key or variable name for a message: as is if it is a short bare name, else ``shown``."""
    if len(name) <= MAX_SHOWN_CHARS and _BARE_NAME_RE.fullmatch(name):
        return name
    return shown(name)


def shown_path(text: str) -> str:
    """A file path for a message: as is if it is short and printable, else ``shown``."""
    return text if len(text) <= MAX_SHOWN_CHARS and text.isprintable() else shown(text)


def shown_number(value: int | float | str) -> str:
    """A number (or the digits of one) for a message, bounded like ``shown`` bounds text."""
    text = str(value)
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    return f"{text[:MAX_SHOWN_CHARS]}… ({len(text)} digits)"


def _escape(char: str) -> str:
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def describe(value: object) -> str:
    """A parsed value as a message shows it: its TOML type, and the value itself if scalar."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {shown(value)}"
    if isinstance(value, int):
        return f"integer {shown_number(value)}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, list):
        return "array"
    return "table" if isinstance(value, dict) else type(value).__name__  # datetime, date, time


def dotted(path: KeyPath) -> str:
    """``("gateway", 0, "endpoints")`` → ``gateway[0].endpoints``; odd keys as ``shown``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{shown_name(part)}" if text else shown_name(part)
    return text


def env_name(path: KeyPath) -> str:
    """The variable that sets ``path``, e.g. ``TUNNELD_GATEWAY_0_ENDPOINTS``."""
    return "_".join(str(part).upper() for part in ("TUNNELD", *path))


# --- rendered TOML --------------------------------------------------------------------------


def toml_value(value: object) -> str:
    """``value`` as rendered TOML: a tuple as an array of strings, a whole float as an integer
    (``Table.seconds`` reads either), a value of any other type as the string ``str(value)``.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(quote(str(item)) for item in value) + "]"
    return quote(str(value))


def toml_lines(**values: object) -> list[str]:
    """``key = value`` lines in argument order, values as ``toml_value`` renders them.

    A None value is left out.
    """
    return [f"{key} = {toml_value(value)}" for key, value in values.items() if value is not None]


# --- file paths -----------------------------------------------------------------------------


def file_path(text: str, relative_to: Path | None) -> Path:
    """``text`` as a file path, a relative one resolved against ``relative_to``.

    ``relative_to`` is None when the working directory, which it would have been, no longer
    exists: then only an absolute path will do. ``ValueError`` says what is wrong, as a problem.
    """
    if not text:
        raise ValueError("must not be empty; expected a file path")
    if "\0" in text:  # no file has one; os.open() would raise ValueError, not OSError
        raise ValueError(f"{shown(text)} contains a NUL character")
    if any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in text):
        raise ValueError(
            f"{shown(text)} contains a control character; every message about the file would "
            "carry it: rename the file"
        )
    if len(text.encode("utf-8", "surrogatepass")) >= PATH_MAX_BYTES:
        raise ValueError(
            f"{shown(text)} is longer than {PATH_MAX_BYTES - 1} bytes, the longest path Linux opens"
        )
    if Path(text).is_absolute():
        return Path(text)
    if relative_to is None:
        raise ValueError(
            f"{shown(text)} is relative, but the working directory it would be relative to "
            "no longer exists; use an absolute path"
        )
    return relative_to / text


# --- problem collection and typed reads -----------------------------------------------------


@dataclass
class Context:
    """One load: where values came from, and every problem found so far."""

    label: str  # the file name as the user gave it, or "environment"
    #: Advice added to "unknown key" for keys users are known to write by mistake.
    unknown_key_hints: Mapping[str, str] = field(default_factory=dict)
    env_origins: dict[KeyPath, str] = field(default_factory=dict)  # key path → variable
    problems: list[str] = field(default_factory=list)

    def env_variable(self, path: KeyPath) -> str | None:
        """The variable that set ``path`` (or the list that ``path`` is an item of)."""
        for end in range(len(path), 0, -1):
            if path[:end] in self.env_origins:
                return self.env_origins[path[:end]]
        return None

    def add(self, path: KeyPath, message: str) -> None:
        """Record a problem with the value at ``path``, named as the user wrote it."""
        variable = self.env_variable(path)
        if variable is not None:
            self.problems.append(f"environment: {shown_name(variable)}: {message}")
        else:
            self.problems.append(f"{self.label}: {dotted(path) or 'top level'}: {message}")


class Table:
    """Typed reads from one table; a bad value becomes a problem and a fallback.

    Every key read is remembered, so ``done`` can report the keys nobody asked for.
    """

    def __init__(self, ctx: Context, path: KeyPath, raw: dict[str, object]) -> None:
        self.ctx = ctx
        self.path = path
        self.raw = raw
        self.known: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.ctx.add((*self.path, key), message)

    def missing(self, key: str, expected: str) -> None:
        variable = env_name((*self.path, key))
        self.problem(key, f"missing; expected {expected} (in the file or as {variable})")

    def _get(self, key: str) -> object | None:  # TOML has no null: None means absent
        self.known.append(key)
        return self.raw.get(key)

    def _env_text(self, key: str, value: object) -> str | None:
        """``value`` if a variable set it, so it is text still to be parsed; else None."""
        from_env = (*self.path, key) in self.ctx.env_origins
        return value if from_env and isinstance(value, str) else None

    def optional_text(self, key: str) -> str | None:
        value = self._get(key)
        if value is None or isinstance(value, str):
            return value
        self.problem(key, f"expected a string, got {describe(value)}")
        return None

    def required_text(self, key: str, expected: str) -> str | None:
        """A string that must be set; None if it is missing or not a string (both reported)."""
        value = self.optional_text(key)
        if value is None and key not in self.raw:
            self.missing(key, expected)
        return value

    def text(self, key: str, default: str) -> str:
        value = self.optional_text(key)
        return default if value is None else value

    def optional_integer(self, key: str, low: int, high: int) -> int | None:
        value = self._get(key)
        env_text = self._env_text(key, value)
        if env_text is not None:
            if not _ENV_INT_RE.fullmatch(env_text.strip()):
                self.problem(key, f"{shown(env_text)} is not an integer (decimal or 0x-hex)")
                return None
            hexadecimal = "x" in env_text.lower()
            digits = env_text.strip().lower().removeprefix("0x").lstrip("0") or "0"
            if len(digits) > _MAX_ENV_INT_CHARS:  # int() would refuse it past 4300 digits
                self.problem(key, f"{shown(env_text)} is out of range (expected {low}–{high})")
                return None
            value = int(digits, 16 if hexadecimal else 10)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, f"expected an integer, got {describe(value)}")
            return None
        if not low <= value <= high:
            self.problem(key, f"{shown_number(value)} is out of range (expected {low}–{high})")
            return None
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.optional_integer(key, low, high)
        return default if value is None else value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        env_text = self._env_text(key, value)
        if env_text is not None:
            parsed = _ENV_BOOLEANS.get(env_text.strip().lower())
            if parsed is None:
                self.problem(key, f"{shown(env_text)} is not a boolean (true, false, 1 or 0)")
                return default
            return parsed
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problem(key, f"expected true or false, got {describe(value)}")
            return default
        return value

    def seconds(self, key: str, default: float) -> float:
        """A duration in seconds, integer or float, more than 0 and at most ``MAX_SECONDS``."""
        value = self._get(key)
        env_text = self._env_text(key, value)
        written = shown_number(value) if isinstance(value, int | float) else ""
        if env_text is not None:
            stripped = env_text.strip()
            if not _ENV_SECONDS_RE.fullmatch(stripped):
                self.problem(key, f"{shown(env_text)} is not a number of seconds, e.g. 10 or 0.5")
                return default
            written = shown_number(stripped)
            value = float(stripped)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(key, f"expected a number of seconds, got {describe(value)}")
            return default
        if not 0 < value <= MAX_SECONDS:  # also refuses nan and inf
            self.problem(
                key,
                f"{written} is out of range (expected seconds, more than 0 and at most "
                f"{MAX_SECONDS})",
            )
            return default
        return float(value)

    def optional_file(self, key: str, relative_to: Path | None) -> Path | None:
        """A file path; a relative one is resolved as ``file_path`` does."""
        text = self.optional_text(key)
        if text is None:
            return None
        try:
            return file_path(text, relative_to)
        except ValueError as exc:
            self.problem(key, str(exc))
            return None

    def strings(self, key: str, expected: str) -> list[tuple[KeyPath, str]]:
        """A required, non-empty list of strings, each with its own key path."""
        value = self._get(key)
        env_text = self._env_text(key, value)
        if env_text is not None:
            value = [item.strip() for item in env_text.split(",") if item.strip()]
        if value is None:
            self.missing(key, expected)
            return []
        if not isinstance(value, list):
            self.problem(key, f"expected a list of {expected}, got {describe(value)}")
            return []
        if not value:
            self.problem(key, f"must not be empty; expected {expected}")
        items = []
        for index, item in enumerate(value):
            if isinstance(item, str):
                items.append(((*self.path, key, index), item))
            else:
                self.ctx.add((*self.path, key, index), f"expected a string, got {describe(item)}")
        return items

    def table(self, key: str) -> dict[str, object]:
        """The sub-table ``[key]``; empty if absent or not a table."""
        value = self._get(key)
        if value is None or isinstance(value, dict):
            return value or {}
        self.problem(key, f"expected a table [{key}], got {describe(value)}")
        return {}

    def sub_table(self, key: str) -> Table | None:
        """The sub-table ``[key]`` to read through; None if absent or not a table (reported)."""
        if key not in self.raw:
            self.known.append(key)
            return None
        is_table = isinstance(self.raw[key], dict)
        raw = self.table(key)  # reports a value that is not a table
        return Table(self.ctx, (*self.path, key), raw) if is_table else None

    def tables(self, key: str) -> list[dict[str, object]]:
        """The array of tables ``[[key]]``; empty if absent or not an array of tables."""
        value = self._get(key)
        if value is None:
            return []
        if isinstance(value, list) and all(isinstance(item, dict) for item in value):
            return value
        self.problem(key, f"expected an array of tables [[{key}]], got {describe(value)}")
        return []

    def refuse(self, keys: Iterable[str], message: str) -> None:
        """Report each of ``keys`` that is set with ``message``: they do not apply here."""
        for key in keys:
            if key in self.raw:
                self.known.append(key)
                self.problem(key, message)

    def done(self) -> None:
        """Report every key that no read asked for: a typo must not pass silently."""
        for key in self.raw:
            if key in self.known:
                continue
            path = (*self.path, key)
            close = difflib.get_close_matches(key, self.known, n=1)
            if self.ctx.env_variable(path) is not None:
                message = "unknown variable"
                suggestion = env_name((*self.path, close[0])) if close else None
            else:
                message = "unknown key"
                suggestion = shown(close[0]) if close else None
            if suggestion:
                message += f"; did you mean {suggestion}?"
            if key in self.ctx.unknown_key_hints:
                message += f"; {self.ctx.unknown_key_hints[key]}"
            self.ctx.add(path, message)
