import json
import logging
import math
import re
import sys

import pytest

from tunneld import logs

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d (?P<level>[A-Z]+) (?P<logger>\S+): (?P<msg>.*)$"
)
RFC3339_UTC_MILLISECONDS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def record(msg: object = "peer %s up", *args: object, **attributes: object) -> logging.LogRecord:
    fields: dict[str, object] = {
        "name": "tunneld.tunnel",
        "levelno": logging.INFO,
        "levelname": "INFO",
        "msg": msg,
        "args": args,
        "created": 1714564800.123456,  # 2024-05-01T12:00:00.123Z
    }
    fields.update(attributes)
    return logging.makeLogRecord(fields)


def formatted(log_record: logging.LogRecord) -> dict[str, object]:
    line = logs.JsonFormatter().format(log_record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert isinstance(parsed, dict)
    return parsed


def test_pyroute2_stays_quiet_at_debug_because_its_dumps_carry_the_private_key() -> None:
    root = logging.getLogger()
    logs.configure("debug")
    assert root.level == logging.DEBUG
    assert logging.getLogger("pyroute2.netlink.core").getEffectiveLevel() >= logging.WARNING
    logs.configure("debug", "json")
    assert logging.getLogger("pyroute2.netlink.core").getEffectiveLevel() >= logging.WARNING


def test_the_formats_are_text_and_json() -> None:
    assert logs.LOG_FORMATS == ("text", "json")


# --- JSON records ----------------------------------------------------------------------------


def test_a_json_record_carries_time_level_logger_and_the_formatted_message() -> None:
    assert formatted(record("peer %s up via %s", "edge-1", "203.0.113.7:51820")) == {
        "ts": "2024-05-01T12:00:00.123Z",
        "level": "info",
        "logger": "tunneld.tunnel",
        "msg": "peer edge-1 up via 203.0.113.7:51820",
    }


@pytest.mark.parametrize(
    ("created", "expected"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1714564800.9999, "2024-05-01T12:00:00.999Z"),  # milliseconds never round into the next s
        (1714564801.0005, "2024-05-01T12:00:01.000Z"),
    ],
)
def test_the_timestamp_is_rfc3339_utc_with_milliseconds(created: float, expected: str) -> None:
    ts = formatted(record(created=created))["ts"]
    assert ts == expected
    assert RFC3339_UTC_MILLISECONDS.match(expected)


def test_an_exception_is_one_field_and_the_record_stays_one_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        exc_info = sys.exc_info()
    fields = formatted(record("reload failed", exc_info=exc_info))
    assert fields["msg"] == "reload failed"
    assert isinstance(fields["exc"], str)
    assert fields["exc"].startswith("Traceback (most recent call last):")
    assert fields["exc"].endswith("ValueError: bad\nvalue")


def test_extra_fields_are_kept_and_what_json_cannot_encode_becomes_its_str() -> None:
    class Endpoint:
        def __str__(self) -> str:
            return "203.0.113.7:51820"

    circular: list[object] = []
    circular.append(circular)
    fields = formatted(
        record(
            peer="edge-1",
            rx_bytes=1024,
            ready=True,
            addresses=["10.44.0.2/24"],
            endpoint=Endpoint(),
            age_seconds=math.nan,
            loop=circular,
        )
    )
    assert fields["peer"] == "edge-1"
    assert fields["rx_bytes"] == 1024
    assert fields["ready"] is True
    assert fields["addresses"] == ["10.44.0.2/24"]
    assert fields["endpoint"] == "203.0.113.7:51820"
    assert fields["age_seconds"] == "nan"  # NaN is not JSON
    assert fields["loop"] == "[[...]]"


def test_an_extra_field_named_like_a_core_field_does_not_replace_it() -> None:
    fields = formatted(record(level="chatty", ts="yesterday", logger="mine"))
    assert fields["level"] == "info"
    assert fields["extra_level"] == "chatty"
    assert fields["extra_ts"] == "yesterday"
    assert fields["extra_logger"] == "mine"


def test_arguments_that_do_not_fit_the_message_still_give_a_line() -> None:
    fields = formatted(record("%d peers", "many"))
    assert fields["msg"] == "%d peers (arguments that do not fit it: ('many',))"


def test_values_whose_str_raises_still_give_a_line() -> None:
    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError("no str")

        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    fields = formatted(record(Hostile(), weird=Hostile()))
    assert fields == {
        "ts": "2024-05-01T12:00:00.123Z",
        "level": "info",
        "logger": "tunneld.tunnel",
        "msg": "<unprintable Hostile>",
        "weird": "<unprintable Hostile>",
    }


def test_a_record_that_breaks_the_formatter_still_gives_a_line() -> None:
    fields = formatted(record("probe failed", exc_info="not an exception tuple"))
    assert fields["level"] == "info"
    assert fields["logger"] == "tunneld.tunnel"
    assert str(fields["msg"]).startswith("unformattable log record: ")
    assert fields["raw_msg"] == "probe failed"


def test_a_record_in_json_through_the_root_logger(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "json")
    logger = logging.getLogger("tunneld.test")
    logger.info("peer %s up", "edge-1", extra={"peer": "edge-1"})
    logger.debug("not shown at info")
    try:
        raise OSError("no route")
    except OSError:
        logger.exception("probe failed")
    first, second = (json.loads(line) for line in lines(capsys))
    assert first["msg"] == "peer edge-1 up"
    assert first["peer"] == "edge-1"
    assert first["level"] == "info"
    assert RFC3339_UTC_MILLISECONDS.match(first["ts"])
    assert second["level"] == "error"
    assert second["exc"].endswith("OSError: no route")


# --- choosing the level and the format --------------------------------------------------------


def test_text_stays_as_it_was(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info")
    logging.getLogger("tunneld.test").warning("peer %s down", "edge-1")
    (line,) = lines(capsys)
    match = TEXT_LINE.match(line)
    assert match is not None, line
    assert match.groupdict() == {
        "level": "WARNING",
        "logger": "tunneld.test",
        "msg": "peer edge-1 down",
    }


def test_the_format_comes_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNNELD_LOG_FORMAT", "JSON")
    logs.configure()
    logging.getLogger("tunneld.test").info("hello")
    (line,) = lines(capsys)
    assert json.loads(line)["msg"] == "hello"


def test_an_argument_wins_over_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNNELD_LOG_FORMAT", "json")
    monkeypatch.setenv("TUNNELD_LOG_LEVEL", "error")
    logs.configure("info", "text")
    logging.getLogger("tunneld.test").info("hello")
    (line,) = lines(capsys)
    assert TEXT_LINE.match(line)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("TUNNELD_LOG_FORMAT", "xml", "log format from $TUNNELD_LOG_FORMAT 'xml' is not one of "),
        ("TUNNELD_LOG_LEVEL", "verbose", "log level from $TUNNELD_LOG_LEVEL 'verbose' is not one"),
    ],
)
def test_an_unknown_value_falls_back_with_one_warning(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    expected: str,
) -> None:
    monkeypatch.setenv(variable, value)
    logs.configure()
    assert logging.getLogger().level == logging.INFO
    logging.getLogger("tunneld.test").info("still logging")
    warning, line = lines(capsys)
    assert expected in warning
    assert TEXT_LINE.match(warning)
    assert TEXT_LINE.match(line)


def test_an_unknown_argument_falls_back_too(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("loud", "yaml")
    assert logging.getLogger().level == logging.INFO
    level_warning, format_warning = lines(capsys)
    assert "log level 'loud' is not one of debug, info, warning, error: using info" in level_warning
    assert "log format 'yaml' is not one of text, json: using text" in format_warning
