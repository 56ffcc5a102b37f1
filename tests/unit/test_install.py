"""``tunneld install-systemd``: what it writes (and never overwrites), what it prints, and that the
unit it installs is the repo's, verified by systemd-analyze in the installed layout."""

from __future__ import annotations

import io
import ipaddress
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import missing_prerequisite
from tunneld import install, keys
from tunneld.cli import main
from tunneld.config import load_config
from tunneld.errors import ConfigError
from tunneld.host_port import HostPort

REPO = Path(__file__).resolve().parents[2]
GATEWAY_KEY = keys.encode_key(keys.public_key(keys.generate_private_key()))
PREFILL = [
    "--address", "10.44.0.2/24",
    "--gateway-endpoint", "gw.example.net:51820",
    "--gateway-public-key", GATEWAY_KEY,
]  # fmt: skip

UNIT = Path("etc/systemd/system/tunneld.service")
CONFIG = Path("etc/tunneld/tunneld.toml")
STATE = Path("var/lib/tunneld")
KEY = STATE / "private.key"


def run(root: Path, capsys: pytest.CaptureFixture[str], *options: str) -> tuple[int, str, str]:
    status = main(["install-systemd", "--root", str(root), *options])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def printed_public_key(out: str) -> str:
    match = re.search(r"^This connector's public key: (\S+)$", out, re.MULTILINE)
    assert match, out
    return match[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_embedded_unit_is_the_repo_unit() -> None:
    repo_unit = (REPO / "systemd" / "tunneld.service").read_text()
    assert repo_unit == install.UNIT_TEXT, (
        "systemd/tunneld.service changed: copy it into UNIT_TEXT in tunneld/systemd_unit.py"
    )


def test_install_writes_the_unit_key_and_config_with_their_modes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(tmp_path, capsys)
    assert status == 0, err
    assert (tmp_path / UNIT).read_bytes() == (REPO / "systemd" / "tunneld.service").read_bytes()
    assert mode(tmp_path / UNIT) == 0o644
    # The config holds no secret and the service's dynamic user must read it.
    assert mode(tmp_path / CONFIG) == 0o644
    assert mode(tmp_path / CONFIG.parent) == 0o755  # ConfigurationDirectoryMode=0755
    assert mode(tmp_path / STATE) == 0o700  # StateDirectoryMode=0700
    assert mode(tmp_path / KEY) == 0o600
    public = keys.encode_key(keys.public_key(keys.load_key_file(tmp_path / KEY)))
    assert printed_public_key(out) == public
    # Nothing systemd-ish happens with --root; the next steps say what to run on the target.
    assert "systemd: " not in out
    assert "systemctl daemon-reload\n" in out and "systemctl enable --now tunneld" in out
    assert not [entry for entry in tmp_path.rglob("*") if entry.name.endswith(".tmp")]


def test_a_rerun_keeps_the_key_and_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(tmp_path, capsys, *PREFILL)
    assert status == 0
    key, config = (tmp_path / KEY).read_bytes(), (tmp_path / CONFIG).read_bytes()
    first_public = printed_public_key(out)
    status, out, _ = run(tmp_path, capsys, "--address", "10.99.0.2/24")
    assert status == 0
    assert (tmp_path / KEY).read_bytes() == key
    assert (tmp_path / CONFIG).read_bytes() == config
    assert printed_public_key(out) == first_public
    assert f"{tmp_path / UNIT}: unchanged" in out
    assert f"{tmp_path / KEY}: kept" in out
    assert f"{tmp_path / CONFIG}: kept" in out
    assert "were not applied" in out
    # The peer lines follow the config that is there, not the options that were not applied.
    assert "AllowedIPs = 10.44.0.2/32" in out


def test_a_different_unit_is_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / UNIT).parent.mkdir(parents=True)
    (tmp_path / UNIT).write_text("[Service]\nExecStart=/bin/true\n")
    status, out, _ = run(tmp_path, capsys)
    assert status == 0
    assert (tmp_path / UNIT).read_text() == install.UNIT_TEXT
    assert "replaced a different version" in out


def test_the_gateway_lines_name_the_key_and_the_tunnel_addresses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(tmp_path, capsys, "--address", "10.44.0.2/24", "--address", "fd44::2/64")
    assert status == 0
    public = printed_public_key(out)
    assert public == keys.encode_key(keys.public_key(keys.load_key_file(tmp_path / KEY)))
    stanza = out[out.index("[Peer]") :].split("\n\n")[0].splitlines()
    assert f"PublicKey = {public}" in stanza
    assert "AllowedIPs = 10.44.0.2/32, fd44::2/128" in stanza
    assert not [line for line in stanza if line.startswith(("Endpoint", "PersistentKeepalive"))]
    assert f"wg set wg0 peer {public} allowed-ips 10.44.0.2/32,fd44::2/128" in out
    assert "PersistentKeepalive" in out  # why the gateway needs none is explained


def test_the_prefilled_config_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(tmp_path, capsys, *PREFILL, "--gateway-endpoint", "203.0.113.7:51820")
    assert status == 0
    assert "to fill in" not in out
    config = load_config(tmp_path / CONFIG, environ={})
    assert config.interface.addresses == (ipaddress.ip_interface("10.44.0.2/24"),)
    assert config.interface.private_key.path == Path("/var/lib/tunneld/private.key")
    (gateway,) = config.gateways
    assert keys.encode_key(gateway.public_key) == GATEWAY_KEY
    assert gateway.endpoints == (HostPort("gw.example.net", 51820), HostPort("203.0.113.7", 51820))
    # The gateway's tunnel address is assumed to be the network's first, and says so.
    assert gateway.allowed_ips == (ipaddress.ip_network("10.44.0.1/32"),)
    assert "# Assumed: the first address" in (tmp_path / CONFIG).read_text()
    assert gateway.persistent_keepalive_seconds == 25


def test_check_config_names_each_placeholder_and_accepts_them_filled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(tmp_path, capsys)
    assert status == 0
    todo = ["interface.address", "gateway[0].public_key", "gateway[0].endpoints",
            "gateway[0].allowed_ips"]  # fmt: skip
    assert f"to fill in: {', '.join(todo)}" in out
    path = tmp_path / CONFIG
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    named = [re.sub(r"\[\d+\]$", "", problem.split(": ")[1]) for problem in error.value.problems]
    assert named == todo
    text = path.read_text()
    assert text.count("# TODO:") == len(todo) + 1  # one per key, and the header
    filled = (
        text.replace(install.ADDRESS_PLACEHOLDER, "10.44.0.2/24")
        .replace(install.PUBLIC_KEY_PLACEHOLDER, GATEWAY_KEY)
        .replace(install.ENDPOINT_PLACEHOLDER, "gw.example.net:51820")
        .replace(install.GATEWAY_ADDRESS_PLACEHOLDER, "10.44.0.1/32")
    )
    path.write_text(filled)
    config = load_config(path, environ={})
    assert [str(address) for address in config.interface.addresses] == ["10.44.0.2/24"]
    assert main(["check-config", "-c", str(path)]) == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--address", "10.44.0.2"], '--address: "10.44.0.2" has no prefix length'),
        (["--address", "10.44.0.300/24"], '--address: "10.44.0.300/24" is not an IP address'),
        (["--gateway-public-key", "not-a-key"], "--gateway-public-key: the value is not a "),
        (["--gateway-public-key", GATEWAY_KEY[:-2]], "--gateway-public-key: "),
        (["--gateway-endpoint", "gw.example.net"], '--gateway-endpoint: "gw.example.net" is '),
        (["--gateway-endpoint", "gw:70000"], '--gateway-endpoint: "gw:70000" is not host:port'),
        (["--gateway-address", "10.44.0.0/24"], '--gateway-address: "10.44.0.0/24" is a network'),
        (["--address", "10.44.0.2/24", "--gateway-address", "10.44.0.2"], "this connector's"),
        (["-c", "relative.toml"], '-c: "relative.toml" is relative: with --root'),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    root = tmp_path / "root"
    status, out, err = run(root, capsys, *options)
    assert status == 2
    assert message in err
    assert out == ""
    assert not root.exists()


def test_a_bad_key_file_is_refused_not_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / STATE).mkdir(parents=True)
    (tmp_path / KEY).write_text("not a key\n")
    (tmp_path / KEY).chmod(0o644)
    status, _, err = run(tmp_path, capsys)
    assert status == 2
    assert "chmod 600" in err
    assert (tmp_path / KEY).read_text() == "not a key\n"


def test_an_existing_config_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / CONFIG).parent.mkdir(parents=True)
    (tmp_path / CONFIG).write_text(
        '[interface]\nprivate_key_file = "keys/host.key"\naddress = ["10.44.7.9/24"]\n'
    )
    status, out, _ = run(tmp_path, capsys)
    assert status == 0
    key_path = tmp_path / CONFIG.parent / "keys" / "host.key"  # relative to the config's dir
    assert printed_public_key(out) == keys.encode_key(keys.public_key(keys.load_key_file(key_path)))
    assert "AllowedIPs = 10.44.7.9/32" in out
    assert not (tmp_path / KEY).exists()


def test_a_credential_key_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / CONFIG).parent.mkdir(parents=True)
    (tmp_path / CONFIG).write_text('[interface]\nprivate_key_credential = "tunneld.key"\n')
    status, out, _ = run(tmp_path, capsys)
    assert status == 0
    assert 'systemd credential "tunneld.key"' in out
    assert "public key" not in out
    assert not (tmp_path / STATE).exists()


def test_a_state_directory_that_systemd_made_private_gets_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private = tmp_path / "var/lib/private/tunneld"
    private.mkdir(parents=True, mode=0o700)
    if os.geteuid() == 0:
        os.chown(private, 61234, 61234)  # the dynamic user systemd gave it to
    (tmp_path / "var/lib/tunneld").symlink_to("private/tunneld")
    status, out, _ = run(tmp_path, capsys)
    assert status == 0
    key = private / "private.key"
    assert printed_public_key(out) == keys.encode_key(keys.public_key(keys.load_key_file(key)))
    if os.geteuid() == 0:  # systemd would not re-own it: the directory's owner is right already
        assert (key.stat().st_uid, key.stat().st_gid) == (61234, 61234)


def test_without_root_privileges_it_refuses_before_writing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert install.install_systemd(install.InstallRequest(root=None)) == 2
    assert "must run as root" in capsys.readouterr().err


def test_daemon_reload_runs_only_where_systemd_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(install, "SYSTEMD_RUNTIME_DIR", tmp_path / "no-systemd")
    out = io.StringIO()
    assert install._reload_systemd(out) == 0
    assert "not running here" in out.getvalue()
    assert not calls.exists()
    monkeypatch.setattr(install, "SYSTEMD_RUNTIME_DIR", tmp_path)
    assert install._reload_systemd(out) == 0
    assert calls.read_text() == "daemon-reload\n"
    fake.write_text("#!/bin/sh\necho 'Access denied' >&2\nexit 1\n")
    assert install._reload_systemd(out) == 1


def test_the_gateway_address_is_inferred_only_where_the_convention_holds() -> None:
    def inferred(*addresses: str) -> list[str]:
        interfaces = [ipaddress.ip_interface(address) for address in addresses]
        return [str(address) for address in install.inferred_gateway_addresses(interfaces)]

    assert inferred("10.44.0.2/24", "fd44::2/64") == ["10.44.0.1", "fd44::1"]
    assert inferred("10.44.0.1/24") == []  # the connector is the first address itself
    assert inferred("10.44.0.2/32", "10.44.0.2/31") == []  # no network to speak of


def test_the_installed_unit_passes_systemd_analyze_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As scripts/check-unit verifies the repo's unit, in the layout install wrote."""
    if shutil.which("systemd-analyze") is None:
        missing_prerequisite("systemd-analyze is not installed (scripts/check-unit installs it)")
    assert run(tmp_path, capsys)[0] == 0
    # What verify needs besides the unit: the stock units (network-online.target, ...), the
    # real kill(1) of ExecReload=, and an executable at ExecStart='s path (it runs nothing).
    for stock in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if stock.is_dir():
            shutil.copytree(stock, tmp_path / "usr/lib/systemd/system", symlinks=True)
            break
    (tmp_path / "usr/bin").mkdir(parents=True, exist_ok=True)
    (tmp_path / "bin").symlink_to("usr/bin")
    kill = shutil.which("kill")
    assert kill is not None
    shutil.copy(kill, tmp_path / "usr/bin/kill")
    stand_in = tmp_path / "usr/local/bin/tunneld"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={tmp_path}", "tunneld.service"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = (result.stdout + result.stderr).replace(str(tmp_path), "")
    assert result.returncode == 0, output
    assert output.strip() == "", "verify warned (any warning counts, as in scripts/check-unit)"
