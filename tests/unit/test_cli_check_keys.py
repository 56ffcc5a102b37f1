"""``check-config`` refuses every key or secret file that ``run`` would refuse, the same way.

``run`` loads the private key (creating it if it is missing), each gateway's preshared key and
each service's header secret. ``check-config`` used to validate the config alone and exit 0 for
a key file that is a symlink to /etc/shadow, a FIFO, a directory or not a key at all. Now it
reads every such file as ``run`` does (never printing it, never blocking on a FIFO) and creates
nothing: a missing private key file is fine, since ``run`` creates it.
"""

from __future__ import annotations

import os
import signal
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tunneld import keys
from tunneld.cli import main
from tunneld.config import load_config
from tunneld.errors import KeyFileError
from tunneld.proxy.server import load_service_secrets
from tunneld.tunnel import load_tunnel_keys

GATEWAY_PUBLIC = keys.encode_key(keys.public_key(keys.generate_private_key()))
PRIVATE = keys.encode_key(keys.generate_private_key())


def write_config(directory: Path, extra: str = "", key: str = "private.key") -> Path:
    path = directory / "tunneld.toml"
    path.write_text(
        textwrap.dedent(f"""\
        [interface]
        private_key_file = "{key}"
        address = ["10.44.0.2/24"]

        [[gateway]]
        public_key = "{GATEWAY_PUBLIC}"
        endpoints = ["gw.example.net:51820"]
        allowed_ips = ["10.44.0.1/32"]
        """)
        + textwrap.dedent(extra)
    )
    return path


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A FIFO opened without O_NONBLOCK waits for a writer for ever: fail instead."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("check-config blocked (on a FIFO?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fifo(path: Path) -> None:
    os.mkfifo(path, 0o600)


def shadow(path: Path) -> None:
    if not Path("/etc/shadow").exists():
        pytest.fail("this test needs /etc/shadow (mode 0640 on Debian)")
    path.symlink_to("/etc/shadow")


def directory(path: Path) -> None:
    path.mkdir(mode=0o700)


def not_a_key(path: Path) -> None:
    path.write_text("hello, this is not a key\n")
    path.chmod(0o600)


def world_readable(path: Path) -> None:
    path.write_text(PRIVATE + "\n")
    path.chmod(0o644)


def huge(path: Path) -> None:
    with path.open("wb") as file:
        file.truncate(1 << 30)  # 1 GiB, sparse
    path.chmod(0o600)


def dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def dangling(path: Path) -> None:
    path.symlink_to(path.parent / "nowhere")


BAD_FILES: list[Callable[[Path], None]] = [
    shadow, fifo, directory, not_a_key, world_readable, huge, dev_zero, dangling,
]  # fmt: skip


def refusal_of_run(config_path: Path) -> str:
    """What ``run`` says about the files of this config: the message it exits 2 with."""
    config = load_config(config_path, environ={})
    with pytest.raises(KeyFileError) as info:
        load_tunnel_keys(config, create_missing=True)
        load_service_secrets(config)
    return str(info.value)


@pytest.mark.parametrize("make", BAD_FILES, ids=lambda make: make.__name__)
def test_check_config_refuses_a_private_key_file_that_run_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], None]
) -> None:
    make(tmp_path / "private.key")
    path = write_config(tmp_path)
    expected = refusal_of_run(path)
    assert main(["check-config", "-c", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert expected in captured.err


@pytest.mark.parametrize("make", BAD_FILES, ids=lambda make: make.__name__)
def test_check_config_refuses_a_preshared_key_file_that_run_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], None]
) -> None:
    make(tmp_path / "edge.psk")
    path = write_config(tmp_path, 'preshared_key_file = "edge.psk"\n')
    expected = refusal_of_run(path)
    assert "preshared key file" in expected or "edge.psk" in expected
    assert main(["check-config", "-c", str(path)]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    "make", [make for make in BAD_FILES if make is not not_a_key], ids=lambda make: make.__name__
)  # any text is a header secret
def test_check_config_refuses_a_header_secret_file_that_run_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], None]
) -> None:
    make(tmp_path / "header.secret")
    services = """
        [[service]]
        name = "vault"
        hosts = ["vault"]
        upstream = "http://127.0.0.1:8200"
        [service.require_header]
        name = "X-Backend-Secret"
        value_file = "header.secret"
        """
    path = write_config(tmp_path, services)
    expected = refusal_of_run(path)
    assert main(["check-config", "-c", str(path)]) == 2
    assert expected in capsys.readouterr().err


def test_check_config_reports_every_bad_file_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo(tmp_path / "private.key")
    directory(tmp_path / "edge.psk")
    path = write_config(tmp_path, 'preshared_key_file = "edge.psk"\n')
    assert main(["check-config", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "private.key" in err and "edge.psk" in err


def test_a_missing_private_key_is_fine_and_nothing_is_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, key="state/keys/private.key")
    before = sorted(tmp_path.rglob("*"))
    assert main(["check-config", "-c", str(path)]) == 0
    assert sorted(tmp_path.rglob("*")) == before
    captured = capsys.readouterr()
    assert "private.key does not exist; tunneld run will create it" in captured.err
    assert "[interface]" in captured.out


def test_a_private_key_that_cannot_be_created_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "state").write_text("a file where a directory should be\n")
    path = write_config(tmp_path, key="state/keys/private.key")
    assert main(["check-config", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cannot create directory" in err and "Not a directory" in err
    assert not (tmp_path / "state").is_dir()


def test_a_good_key_passes_and_is_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "private.key").write_text(PRIVATE + "\n")
    (tmp_path / "private.key").chmod(0o600)
    path = write_config(tmp_path)
    assert main(["check-config", "-c", str(path)]) == 0
    captured = capsys.readouterr()
    assert PRIVATE not in captured.out + captured.err
    assert "will create" not in captured.err


def test_a_missing_credential_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "credentials").mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('private_key_file = "private.key"',
                                             'private_key_credential = "tunneld.key"'))  # fmt: skip
    assert main(["check-config", "-c", str(path)]) == 2  # run creates no credential
    assert "tunneld.key: does not exist" in capsys.readouterr().err


def test_reload_refuses_what_the_daemon_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon reloads without creating keys: `tunneld reload` says so, and sends nothing."""
    path = write_config(tmp_path, key="missing.key")
    monkeypatch.setattr("tunneld.cli.running_daemon_pid", lambda ifname: 4242)
    signals: list[tuple[int, int]] = []
    monkeypatch.setattr("tunneld.cli.os.kill", lambda pid, signum: signals.append((pid, signum)))
    assert main(["reload", "-c", str(path)]) == 2
    assert "missing.key: does not exist" in capsys.readouterr().err
    assert signals == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"", "is empty"), (b"  \n", "is empty"), (b"abc\ndef\n", "control character")],
    ids=["empty", "blank", "two-lines"],
)
def test_a_header_secret_that_no_request_could_carry_is_refused_by_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, problem: str
) -> None:
    """An empty secret made run fail with "the require_header secret was not loaded" while
    check-config passed; a secret with a line break can never be sent in a header."""
    (tmp_path / "header.secret").write_bytes(content)
    (tmp_path / "header.secret").chmod(0o600)
    services = """
        [[service]]
        name = "vault"
        hosts = ["vault"]
        upstream = "http://127.0.0.1:8200"
        [service.require_header]
        name = "X-Backend-Secret"
        value_file = "header.secret"
        """
    path = write_config(tmp_path, services)
    with pytest.raises(KeyFileError) as info:
        load_service_secrets(load_config(path, environ={}))
    assert problem in str(info.value)
    assert main(["check-config", "-c", str(path)]) == 2
    assert str(info.value) in capsys.readouterr().err


def test_a_config_with_a_flood_of_problems_prints_the_first_ones_and_a_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """80,000 empty [[service]] tables fit in the 1 MiB file: 240,000 problems, 25 MB of log."""
    path = write_config(tmp_path, "[[service]]\n" * 5000)
    assert main(["check-config", "-c", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1001
    assert lines[-1].endswith(
        "… and 14000 more problems (15000 in all); fix these first, then check again"
    )
