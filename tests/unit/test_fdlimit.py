"""File descriptors: the connection budget, raising the soft limit, recognising exhaustion."""

from __future__ import annotations

import errno
import logging
import resource
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.conftest import missing_prerequisite
from tunneld import fdlimit, keys
from tunneld.config import Config, load_config
from tunneld.config_reader import toml_lines
from tunneld.errors import BackendError, ConfigError
from tunneld.fdlimit import (
    AUTO_MAX_CONNECTIONS,
    CONTROL_PLANE_FDS,
    EXCESS_ANSWERS,
    OBSERVABILITY_CONNECTIONS,
    ExhaustionLog,
    connection_budget,
    control_plane_reserve,
    exhaustion,
)


def make_config(
    tmp_path: Path,
    proxy: str = "",
    metrics: str = "",
    services: int = 1,
    environ: dict[str, str] | None = None,
) -> Config:
    service_tables = "".join(
        f'\n[[service]]\nname = "s{index}"\nhosts = ["s{index}"]\n'
        f'upstream = "http://127.0.0.1:{8080 + index}"\n'
        for index in range(services)
    )
    path = tmp_path / "tunneld.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [interface]
            name = "tdunit0"
            address = ["10.44.0.2/24"]

            [[gateway]]
            name = "edge-1"
            public_key = "{keys.encode_key(keys.public_key(keys.generate_private_key()))}"
            endpoints = ["198.18.0.1:51820"]
            allowed_ips = ["10.44.0.1/32"]

            [proxy]
            {proxy}

            [metrics]
            {metrics}
            """
        )
        + service_tables
    )
    return load_config(path, environ or {})


# -- the budget --------------------------------------------------------------------------------


def test_auto_takes_what_is_left_after_the_reserve_two_descriptors_each() -> None:
    budget = connection_budget(None, open_files=1024, reserve=400)
    assert budget.max_connections == 312
    assert not budget.clamped
    assert budget.describe() == (
        "max_connections 312 (auto): open files limit 1024, 400 kept for the control plane, "
        "2 per connection"
    )


def test_auto_stops_at_its_cap_under_a_high_limit() -> None:
    assert connection_budget(None, 1 << 20, 400).max_connections == AUTO_MAX_CONNECTIONS


def test_a_configured_number_that_fits_is_kept() -> None:
    budget = connection_budget(100, 1024, 400)
    assert (budget.max_connections, budget.clamped) == (100, False)


def test_a_configured_number_beyond_the_limit_is_lowered_and_says_how_to_allow_it() -> None:
    budget = connection_budget(1024, 1024, 400)
    assert (budget.max_connections, budget.clamped) == (312, True)
    assert "1024 configured, lowered to fit the open files limit" in budget.describe()
    assert "LimitNOFILE=" in budget.describe()


def test_a_limit_below_the_reserve_still_allows_one_connection() -> None:
    assert connection_budget(None, 256, 400).max_connections == 1


def test_the_reserve_counts_observability_excess_answers_and_http_pools(tmp_path: Path) -> None:
    fixed = CONTROL_PLANE_FDS + EXCESS_ANSWERS
    config = make_config(tmp_path, services=3)
    assert control_plane_reserve(config) == fixed + OBSERVABILITY_CONNECTIONS + 3 * 16
    off = make_config(tmp_path, metrics='listen = "off"', services=1)
    assert control_plane_reserve(off) == fixed + 16


# -- the config key ----------------------------------------------------------------------------


def test_max_connections_is_auto_by_default_and_when_said(tmp_path: Path) -> None:
    assert make_config(tmp_path).proxy.max_connections is None
    assert make_config(tmp_path, 'max_connections = "auto"').proxy.max_connections is None
    assert make_config(tmp_path, "max_connections = 64").proxy.max_connections == 64


def test_max_connections_from_the_environment(tmp_path: Path) -> None:
    variable = "TUNNELD_PROXY_MAX_CONNECTIONS"
    assert make_config(tmp_path, environ={variable: "auto"}).proxy.max_connections is None
    assert make_config(tmp_path, environ={variable: "512"}).proxy.max_connections == 512
    with pytest.raises(ConfigError, match=f'{variable}: "many": expected "auto" or an integer'):
        make_config(tmp_path, environ={variable: "many"})


def test_max_connections_refuses_other_words(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'proxy\.max_connections: "lots": expected "auto"'):
        make_config(tmp_path, 'max_connections = "lots"')


def test_rendered_auto_reads_back(tmp_path: Path) -> None:
    assert toml_lines(max_connections="auto") == ['max_connections = "auto"']


# -- raising the soft limit --------------------------------------------------------------------


@pytest.fixture
def restore_nofile() -> Iterator[tuple[int, int]]:
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    setrlimit = resource.setrlimit  # the real one, even if a test replaced it
    try:
        yield limits
    finally:
        setrlimit(resource.RLIMIT_NOFILE, limits)


def test_the_soft_limit_is_raised_to_the_hard_one(restore_nofile: tuple[int, int]) -> None:
    _soft, hard = restore_nofile
    if hard == resource.RLIM_INFINITY or hard < 512:
        missing_prerequisite(f"a finite hard limit of at least 512 open files, not {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    assert fdlimit.raise_open_files_limit() == hard
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    assert fdlimit.open_files_limit() == hard


def test_a_refused_raise_keeps_the_soft_limit_and_says_so(
    restore_nofile: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _soft, hard = restore_nofile
    if hard == resource.RLIM_INFINITY or hard < 512:
        missing_prerequisite(f"a finite hard limit of at least 512 open files, not {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    def refuse(which: int, limits: tuple[int, int]) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert fdlimit.raise_open_files_limit() == 256
    assert "could not raise the open files limit from 256" in caplog.text


# -- recognising exhaustion ----------------------------------------------------------------------


def test_exhaustion_is_found_through_translations_and_groups() -> None:
    raw = OSError(errno.EMFILE, "Too many open files")
    assert exhaustion(raw) is raw
    translated = BackendError("talking to wireguard-go failed")
    translated.__cause__ = raw
    assert exhaustion(translated) is raw
    assert exhaustion(ExceptionGroup("probes", [raw, OSError(errno.ENFILE, "x")])) is raw
    assert exhaustion(OSError(errno.ENOMEM, "no memory")) is not None


def test_other_errors_are_not_exhaustion() -> None:
    assert exhaustion(OSError(errno.ECONNREFUSED, "refused")) is None
    assert exhaustion(BackendError("interface gone")) is None
    mixed = ExceptionGroup("probes", [OSError(errno.EMFILE, "x"), ValueError("a bug")])
    assert exhaustion(mixed) is None


async def test_the_exhaustion_log_is_rate_limited(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "tunneld.fdlimit")
    said = ExhaustionLog("the thing", interval_seconds=10)
    error = OSError(errno.EMFILE, "Too many open files")
    with trio.fail_after(60):
        for _ in range(25):
            said.failed(error, retry="again soon")
            await trio.sleep(1)
        said.succeeded()
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "the thing failed: EMFILE (Too many open files); again soon",
        "the thing failed: EMFILE (Too many open files) (9 more since the last report); again soon",
        "the thing failed: EMFILE (Too many open files) (9 more since the last report); again soon",
        "the thing works again after 25 failure(s) for lack of descriptors",
    ]
