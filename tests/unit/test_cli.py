"""The CLI is a function: call ``main(argv)`` and look at the exit code and output."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from tunneld import __version__, keys
from tunneld.cli import main

GATEWAY_PUBLIC = keys.encode_key(keys.public_key(keys.generate_private_key()))


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "tunneld.toml"
    path.write_text(textwrap.dedent(body))
    return path


VALID = f"""\
    [interface]
    name = "tunneld0"
    private_key_file = "private.key"
    address = ["10.44.0.2/24"]

    [[gateway]]
    name = "edge-1"
    public_key = "{GATEWAY_PUBLIC}"
    endpoints = ["gw.example.net:51820"]
    allowed_ips = ["10.44.0.1/32"]
    """


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tunneld {__version__}"


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_genkey_then_pubkey_round_trip(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["genkey"]) == 0
    private = capsys.readouterr().out
    assert len(private) == 45 and private.endswith("\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(private))
    assert main(["pubkey"]) == 0
    public = capsys.readouterr().out
    assert public == keys.encode_key(keys.public_key(keys.decode_key(private))) + "\n"


def test_pubkey_matches_wg_byte_for_byte(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("wg") is None:
        pytest.fail("wg (wireguard-tools) is needed for the interop test; run scripts/bootstrap")
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    expected = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout
    monkeypatch.setattr("sys.stdin", io.StringIO(private))
    assert main(["pubkey"]) == 0
    assert capsys.readouterr().out == expected


def test_pubkey_refuses_garbage_without_echoing_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("c2VjcmV0LXNob3J0\n"))
    assert main(["pubkey"]) == 2
    err = capsys.readouterr().err
    assert "not a WireGuard key" in err
    assert "c2VjcmV0LXNob3J0" not in err


def test_check_config_prints_the_effective_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, VALID)
    assert main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert 'name = "tunneld0"' in out
    assert GATEWAY_PUBLIC in out
    assert str(tmp_path / "private.key") in out


@pytest.mark.parametrize(
    ("replace", "by", "expected"),
    [
        ('name = "tunneld0"', 'name = "a-very-long-interface-name"', "interface.name"),
        ('"gw.example.net:51820"', '"gw.example.net"', "gateway[0].endpoints[0]"),
        ('"10.44.0.2/24"', '"10.44.0.2"', "interface.address[0]"),
        ("allowed_ips", "allowed_ip", 'did you mean "allowed_ips"'),
        ('address = ["10.44.0.2/24"]', 'address = "10.44.0.2/24"', "interface.address"),
        ("[[gateway]]", "[[gateway]", "tunneld.toml"),
    ],
    ids=["long-ifname", "endpoint-without-port", "address-without-prefix", "typo", "wrong-type",
         "malformed-toml"],
)  # fmt: skip
def test_check_config_rejects_bad_input_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], replace: str, by: str, expected: str
) -> None:
    path = write_config(tmp_path, VALID.replace(replace, by))
    assert main(["check-config", "-c", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert expected in captured.err
    assert "tunneld.toml" in captured.err


def test_duplicate_gateway_keys_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    second = VALID[VALID.index("    [[gateway]]") :].replace("edge-1", "edge-2")
    second = second.replace("10.44.0.1/32", "10.44.0.3/32")
    path = write_config(tmp_path, VALID + "\n" + second)
    assert main(["check-config", "-c", str(path)]) == 2
    assert "public_key" in capsys.readouterr().err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "-c", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml" in capsys.readouterr().err


# --- route-test -----------------------------------------------------------------------------

ROUTES = """
    [[service]]
    name = "billing"
    hosts = ["billing", "*.billing.internal"]
    path_prefix = "/v1"
    upstream = "http://127.0.0.1:8080"

    [[service]]
    name = "postgres"
    protocol = "tcp"
    listen_port = 5432
    upstream = "tcp://127.0.0.1:5432"

    [[service]]
    name = "reports"
    hosts = ["reports", "[fd44::2]"]
    upstream = "unix:/run/reports.sock"
    host_rewrite = "reports.local"
    """


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "http://billing/v1/x",
            'http://billing/v1/x → service "billing" (rule 1: hosts billing, *.billing.internal;'
            " path /v1) → http://127.0.0.1:8080",
        ),
        (
            "https://EU.Billing.Internal:8443/v1?x=/v2",
            'https://EU.Billing.Internal:8443/v1?x=/v2 → service "billing" (rule 1: hosts billing,'
            " *.billing.internal; path /v1) → http://127.0.0.1:8080",
        ),
        (
            "http://reports",
            'http://reports → service "reports" (rule 2: hosts reports, [fd44::2]; path /)'
            " → unix:/run/reports.sock (Host: reports.local)",
        ),
        (
            "http://[FD44:0::2]:80/x",
            'http://[FD44:0::2]:80/x → service "reports" (rule 2: hosts reports, [fd44::2];'
            " path /) → unix:/run/reports.sock (Host: reports.local)",
        ),
    ],
)
def test_route_test_names_the_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, expected: str
) -> None:
    path = write_config(tmp_path, VALID + ROUTES)
    assert main(["route-test", "-c", str(path), url]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_route_test_matches_the_canonical_path_as_the_proxy_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, VALID + ROUTES)
    assert main(["route-test", "-c", str(path), "http://billing//%76%31/x"]) == 0
    assert 'service "billing"' in capsys.readouterr().out
    assert main(["route-test", "-c", str(path), "http://billing/v1/..%2fx"]) == 1
    assert capsys.readouterr().out == (
        "http://billing/v1/..%2fx → refused (400): an encoded '/' (%2F) in the request path\n"
    )


@pytest.mark.parametrize(
    "url", ["http://nope/", "http://billing/v10", "http://billing/", "http://postgres/"]
)
def test_route_test_without_a_match_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    path = write_config(tmp_path, VALID + ROUTES)
    assert main(["route-test", "-c", str(path), url]) == 1
    assert capsys.readouterr().out == f"{url} → no service (404)\n"


@pytest.mark.parametrize(
    "url",
    ["billing/v1", "ftp://billing/", "http:///v1", "http://billing:99999/", "http://[::1/",
     "http://bill ing/", "http://billing/\n"],
)  # fmt: skip
def test_route_test_refuses_a_bad_url_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    path = write_config(tmp_path, VALID + ROUTES)
    assert main(["route-test", "-c", str(path), url]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("tunneld route-test: ")
    assert "is not an http:// or https:// URL with a host, e.g. http://billing/v1/x" in captured.err


def test_route_test_with_a_bad_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, VALID + ROUTES.replace("tcp://127.0.0.1:5432", "htp://x"))
    assert main(["route-test", "-c", str(path), "http://billing/v1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert 'service[1].upstream: "htp://x" is not a valid upstream' in captured.err


def test_check_config_never_prints_the_shared_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "backend.secret").write_text("hunter2-correct-horse\n")
    (tmp_path / "backend.secret").chmod(0o600)
    services = """
    [[service]]
    name = "vault"
    hosts = ["vault"]
    upstream = "http://127.0.0.1:8200"
    [service.require_header]
    name = "X-Backend-Secret"
    value_file = "backend.secret"
    """
    path = write_config(tmp_path, VALID + services)
    assert main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert f'value_file = "{tmp_path / "backend.secret"}"' in out
    assert 'name = "x-backend-secret"' in out
    assert "hunter2" not in out


def test_reload_refuses_an_invalid_config_without_signalling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, VALID.replace('address = ["10.44.0.2/24"]', "address = 7"))
    assert main(["reload", "-c", str(path)]) == 2
    assert "interface.address" in capsys.readouterr().err


def test_reload_without_a_running_daemon_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, VALID.replace("tunneld0", "tdnotrunning0"))
    assert main(["reload", "-c", str(path)]) == 1
    assert "no running tunneld manages tdnotrunning0" in capsys.readouterr().err


def test_log_format_json_is_one_object_per_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, VALID.replace('address = ["10.44.0.2/24"]', "address = 7"))
    assert main(["--log-format", "json", "check-config", "-c", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(record["level"] == "error" for record in records)
    assert any("interface.address" in record["msg"] for record in records)
