"""Logging set-up: one event per line on stderr, as text (journald adds its own timestamps) or JSON.

The JSON format is for log shippers (containers, Loki, Elasticsearch): one object per line with
``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``logger`` and ``msg``, then ``exc`` (the
formatted traceback) when the record carries one, then the record's ``extra=`` fields. A field that
JSON cannot encode is written as its ``str()``, and a record that cannot be formatted at all still
yields a line: a log call must never raise because of what it logs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DEFAULT_LEVEL = "info"
DEFAULT_FORMAT = "text"

# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(
    {
        *logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__,
        "message",
        "asctime",
        "taskName",  # Python 3.12+
    }
)
_CORE_FIELDS = ("ts", "level", "logger", "msg", "exc", "stack")

log = logging.getLogger(__name__)


def configure(level: str | None = None, fmt: str | None = None) -> None:
    """Configure the root logger on stderr.

    ``level`` defaults to ``$TUNNELD_LOG_LEVEL`` or info, ``fmt`` (one of :data:`LOG_FORMATS`)
    to ``$TUNNELD_LOG_FORMAT`` or text. An unknown value falls back to the default with one warning
    in the log; it never stops the daemon.
    """
    problems: list[str] = []
    level_name = _choose("level", level, "TUNNELD_LOG_LEVEL", LEVELS, DEFAULT_LEVEL, problems)
    format_name = _choose(
        "format", fmt, "TUNNELD_LOG_FORMAT", LOG_FORMATS, DEFAULT_FORMAT, problems
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format_name == "json" else _text_formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_name.upper())
    # pyroute2 logs every netlink message it receives at DEBUG, and a WireGuard dump carries the
    # device's private key: its loggers stay at WARNING whatever our level is.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    for problem in problems:
        log.warning("%s", problem)


def _choose(
    what: str,
    given: str | None,
    variable: str,
    choices: tuple[str, ...],
    default: str,
    problems: list[str],
) -> str:
    """``given``, else ``$variable``, else ``default``; an unknown value is noted and replaced."""
    source, value = f"log {what}", given
    if not value:
        source, value = f"log {what} from ${variable}", os.environ.get(variable)
    if not value:
        return default
    name = value.strip().lower()
    if name in choices:
        return name
    problems.append(f"{source} {value!r} is not one of {', '.join(choices)}: using {default}")
    return default


def _text_formatter() -> logging.Formatter:
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            return self._format(record)
        except Exception as exc:  # never let a log call fail: say what went wrong instead
            return _join(
                [
                    ("ts", _timestamp(record)),
                    ("level", _level(record)),
                    ("logger", _safe_str(getattr(record, "name", "?"))),
                    ("msg", f"unformattable log record: {_safe_str(exc)}"),
                    ("raw_msg", _safe_str(getattr(record, "msg", ""))),
                ]
            )

    def _format(self, record: logging.LogRecord) -> str:
        fields: list[tuple[str, object]] = [
            ("ts", _timestamp(record)),
            ("level", _level(record)),
            ("logger", record.name),
            ("msg", _message(record)),
        ]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            fields.append(("exc", record.exc_text))
        if record.stack_info:
            fields.append(("stack", self.formatStack(record.stack_info)))
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRIBUTES:
                continue
            # An extra named like a core field does not replace it; it is kept beside it.
            fields.append((f"extra_{key}" if key in _CORE_FIELDS else key, value))
        return _join(fields)


def _join(fields: list[tuple[str, object]]) -> str:
    """Encode field by field, so that one value JSON cannot take costs only that value."""
    parts = []
    for key, value in fields:
        try:
            encoded = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            encoded = json.dumps(_safe_str(value))
        parts.append(f"{json.dumps(key)}: {encoded}")
    return "{" + ", ".join(parts) + "}"


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339 in UTC with milliseconds: ``2024-05-01T12:00:00.123Z``."""
    try:
        milliseconds = int(float(record.created) * 1000)
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(milliseconds // 1000))
        return f"{seconds}.{milliseconds % 1000:03d}Z"
    except Exception:
        return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _level(record: logging.LogRecord) -> str:
    return _safe_str(getattr(record, "levelname", "?")).lower()


def _message(record: logging.LogRecord) -> str:
    """``msg % args``; when those do not fit, the template and the arguments as they are."""
    try:
        return record.getMessage()
    except Exception:
        if not record.args:
            return _safe_str(record.msg)
        return f"{_safe_str(record.msg)} (arguments that do not fit it: {_safe_str(record.args)})"


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        try:
            return repr(value)
        except Exception:
            return f"<unprintable {type(value).__name__}>"
