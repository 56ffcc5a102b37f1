"""Tests for tunneld.keys: key generation, base64 text and private-key files."""

from __future__ import annotations

import base64
import errno
import os
import secrets
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import missing_prerequisite
from tunneld import keys
from tunneld.errors import KeyFileError

# RFC 7748 section 6.1: Alice's and Bob's X25519 key pairs.
RFC7748_PAIRS = [
    (
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
    ),
    (
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
    ),
]

# A fixed, valid key; tests check that its text never leaks into errors.
SECRET = bytes(range(1, 33))
SECRET_TEXT = base64.b64encode(SECRET).decode()


def write_file(path: Path, content: str | bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


def assert_secret_free(exc: BaseException, secret_text: str) -> None:
    """The exception carries no trace of *secret_text*: message, args, repr or chain."""
    for rendering in (str(exc), repr(exc), repr(exc.args)):
        assert secret_text not in rendering
    assert exc.__cause__ is None
    assert exc.__context__ is None


def entries(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that changes it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


# --- generation and public keys ---------------------------------------------------------------


def test_generated_keys_are_clamped_and_distinct() -> None:
    generated = {keys.generate_private_key() for _ in range(200)}
    assert len(generated) == 200
    for key in generated:
        assert len(key) == 32
        assert key[0] & 0b0000_0111 == 0
        assert key[31] & 0b1000_0000 == 0
        assert key[31] & 0b0100_0000 != 0


def test_generate_clamps_like_wg_genkey(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "token_bytes", lambda n: b"\xff" * n)
    assert keys.generate_private_key() == b"\xf8" + b"\xff" * 30 + b"\x7f"
    monkeypatch.setattr(secrets, "token_bytes", lambda n: b"\x00" * n)
    assert keys.generate_private_key() == b"\x00" * 31 + b"\x40"


@pytest.mark.parametrize(("private_hex", "public_hex"), RFC7748_PAIRS)
def test_public_key_matches_rfc7748(private_hex: str, public_hex: str) -> None:
    assert keys.public_key(bytes.fromhex(private_hex)) == bytes.fromhex(public_hex)


@pytest.mark.parametrize("length", [0, 31, 33])
def test_public_key_and_encode_reject_wrong_length(length: int) -> None:
    with pytest.raises(ValueError, match=f"32 bytes, got {length}"):
        keys.public_key(b"\x01" * length)
    with pytest.raises(ValueError, match=f"32 bytes, got {length}"):
        keys.encode_key(b"\x01" * length)


# --- base64 text ------------------------------------------------------------------------------


@given(st.binary(min_size=32, max_size=32))
def test_encode_decode_round_trip(key: bytes) -> None:
    text = keys.encode_key(key)
    assert len(text) == 44
    assert text.endswith("=")
    assert text == base64.b64encode(key).decode()
    assert keys.decode_key(text) == key
    assert keys.decode_key(f" \t{text}\r\n") == key


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (base64.b64encode(bytes(range(100, 131))).decode(), "decodes to 31 bytes, expected 32"),
        (base64.b64encode(bytes(range(100, 133))).decode(), "decodes to 33 bytes, expected 32"),
        ("", "empty"),
        ("  \n", "empty"),
        ("this-is-not-base64-at-all!!", "not valid base64"),
        (SECRET_TEXT[:-1], "not valid base64"),  # padding missing
        (SECRET_TEXT[:20] + " " + SECRET_TEXT[20:], "not valid base64"),  # inner whitespace
        (SECRET_TEXT + "\n" + SECRET_TEXT, "not valid base64"),  # two keys
        (SECRET_TEXT[:20] + "é" + SECRET_TEXT[21:], "not valid base64"),  # non-ASCII
        (SECRET_TEXT[:-2] + "F=", "non-canonical base64"),  # low bits of the last char set
    ],
)
def test_decode_rejects_with_reason_and_without_echo(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="peer public key is not a WireGuard key") as caught:
        keys.decode_key(text, what="peer public key")
    assert reason in str(caught.value)
    if text.strip():
        assert_secret_free(caught.value, text.strip())


@given(st.binary(min_size=6, max_size=64).filter(lambda raw: len(raw) != 32))
def test_decode_never_echoes_wrong_length_input(raw: bytes) -> None:
    text = base64.b64encode(raw).decode()
    with pytest.raises(ValueError, match=f"decodes to {len(raw)} bytes") as caught:
        keys.decode_key(text)
    assert_secret_free(caught.value, text)


# --- loading key files ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_file_loads(tmp_path: Path, mode: int) -> None:
    path = write_file(tmp_path / "private.key", SECRET_TEXT + "\n", mode)
    assert keys.load_key_file(path) == SECRET


def test_symlink_to_owner_only_file_loads(tmp_path: Path) -> None:
    # Kubernetes secrets and systemd credentials reach us through symlinks.
    target = write_file(tmp_path / "target.key", SECRET_TEXT + "\n")
    link = tmp_path / "private.key"
    link.symlink_to(target)
    assert keys.load_key_file(link) == SECRET


@pytest.mark.parametrize(
    ("mode", "access"),
    [
        (0o644, "readable"),
        (0o640, "readable"),
        (0o604, "readable"),
        (0o660, "readable"),
        (0o620, "writable"),
        (0o602, "writable"),
    ],
)
def test_group_or_other_access_is_refused_with_chmod_hint(
    tmp_path: Path, mode: int, access: str
) -> None:
    path = write_file(tmp_path / "private.key", SECRET_TEXT + "\n", mode)
    with pytest.raises(KeyFileError) as caught:
        keys.load_key_file(path)
    assert str(caught.value) == (
        f"{path}: {access} by group/other (mode {mode:04o}); run: chmod 600 {path}"
    )
    assert_secret_free(caught.value, SECRET_TEXT)


def test_mode_of_symlink_target_is_checked(tmp_path: Path) -> None:
    target = write_file(tmp_path / "target.key", SECRET_TEXT + "\n", 0o644)
    link = tmp_path / "private.key"
    link.symlink_to(target)
    with pytest.raises(KeyFileError, match=r"readable by group/other \(mode 0644\)"):
        keys.load_key_file(link)


def test_hint_quotes_paths_for_the_shell(tmp_path: Path) -> None:
    path = write_file(tmp_path / "my key", SECRET_TEXT, 0o644)
    with pytest.raises(KeyFileError, match=f"run: chmod 600 '{path}'$"):
        keys.load_key_file(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    with pytest.raises(KeyFileError) as caught:
        keys.load_key_file(path)
    assert str(caught.value) == (
        f"{path}: does not exist; generate one with: (umask 077; tunneld genkey > {path})"
    )


def test_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "private.key"
    link.symlink_to(tmp_path / "gone.key")
    with pytest.raises(KeyFileError, match="is a symlink to a missing file"):
        keys.load_key_file(link)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (base64.b64encode(SECRET[:31]).decode() + "\n", "decodes to 31 bytes, expected 32"),
        ("", "empty"),
        ("\n", "empty"),
        ("garbage that is no key\n", "not valid base64"),
        (b"\xff\xfe" + SECRET_TEXT.encode()[2:] + b"\n", "not valid base64"),
        (SECRET_TEXT + "\n" + SECRET_TEXT + "\n", "not valid base64"),
    ],
)
def test_file_without_a_key_is_refused_without_echo(
    tmp_path: Path, content: str | bytes, reason: str
) -> None:
    path = write_file(tmp_path / "private.key", content)
    with pytest.raises(KeyFileError) as caught:
        keys.load_key_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a WireGuard private key ({reason}")
    assert message.endswith(f"; generate one with: (umask 077; tunneld genkey > {path})")
    text = content.decode(errors="replace") if isinstance(content, bytes) else content
    if text.strip():
        assert_secret_free(caught.value, text.strip())
    assert_secret_free(caught.value, SECRET_TEXT[2:])


def test_what_names_the_key_and_hint_fits_it(tmp_path: Path) -> None:
    path = write_file(tmp_path / "peer.pub", "nope\n")
    with pytest.raises(KeyFileError) as caught:
        keys.load_key_file(path, what="public key")
    assert "not a WireGuard public key" in str(caught.value)
    assert "genkey" not in str(caught.value)


def test_large_file_is_refused_without_reading_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_file(tmp_path / "private.key", "A" * (keys.MAX_KEY_FILE_BYTES + 1))

    def no_read(*args: object) -> bytes:
        raise AssertionError("a file that fstat says is too large must not be read")

    monkeypatch.setattr(os, "read", no_read)
    with pytest.raises(KeyFileError, match="too large for a private key file"):
        keys.load_key_file(path)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not a regular file"):
        keys.load_key_file(tmp_path)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "private.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        keys.load_key_file(fifo)


def test_symlink_loop_is_an_os_error_with_path(tmp_path: Path) -> None:
    # Works as root too, unlike a chmod-000 file.
    loop = tmp_path / "private.key"
    loop.symlink_to(loop)
    with pytest.raises(KeyFileError, match=f"^{loop}: cannot open \\(.*symbolic links\\)"):
        keys.load_key_file(loop)


def test_permission_denied_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated, so that it runs as root too; the next test is the real thing.
    path = write_file(tmp_path / "private.key", SECRET_TEXT)

    def denied(*args: object, **kwargs: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(KeyFileError, match=f"^{path}: permission denied; tunneld runs as uid"):
        keys.load_key_file(path)


def test_unreadable_file_for_real(tmp_path: Path) -> None:
    path = write_file(tmp_path / "private.key", SECRET_TEXT, 0o000)
    if os.geteuid() != 0:
        with pytest.raises(KeyFileError, match="permission denied"):
            keys.load_key_file(path)
        return
    # Root reads any file; without the DAC capabilities it is held to the mode like anyone.
    script = (
        "import pathlib, sys\n"
        "from tunneld import keys\n"
        "from tunneld.errors import KeyFileError\n"
        "try:\n"
        f"    keys.load_key_file(pathlib.Path({str(path)!r}))\n"
        "except KeyFileError as exc:\n"
        "    print(exc)\n"
    )
    drop = "-dac_override,-dac_read_search"
    result = subprocess.run(
        ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert "permission denied" in result.stdout


# --- creating key files -----------------------------------------------------------------------


@pytest.mark.parametrize("process_umask", [0o000, 0o022, 0o077, 0o277])
@pytest.mark.usefixtures("umask")
def test_create_writes_mode_0600_whatever_the_umask(tmp_path: Path, process_umask: int) -> None:
    os.umask(process_umask)
    path = tmp_path / "private.key"
    key = keys.create_private_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_bytes()
    assert len(content) == 45
    assert content == keys.encode_key(key).encode() + b"\n"
    assert keys.load_key_file(path) == key
    assert entries(tmp_path) == ["private.key"]  # no temporary file left behind


@pytest.mark.usefixtures("umask")
def test_create_makes_missing_parent_with_mode_0700(tmp_path: Path) -> None:
    os.umask(0o022)
    path = tmp_path / "etc" / "tunneld" / "private.key"
    keys.create_private_key_file(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert entries(path.parent) == ["private.key"]


def test_create_never_overwrites(tmp_path: Path) -> None:
    path = write_file(tmp_path / "private.key", SECRET_TEXT + "\n")
    with pytest.raises(KeyFileError, match=f"^{path}: already exists; refusing to overwrite"):
        keys.create_private_key_file(path)
    assert path.read_text() == SECRET_TEXT + "\n"
    assert entries(tmp_path) == ["private.key"]


def test_create_does_not_write_through_a_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "private.key"
    link.symlink_to(tmp_path / "elsewhere.key")
    with pytest.raises(KeyFileError, match="already exists"):
        keys.create_private_key_file(link)
    assert entries(tmp_path) == ["private.key"]


@pytest.mark.parametrize("failing", ["fsync", "link", "write"])
def test_failed_create_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, failing, no_space)
    path = tmp_path / "private.key"
    with pytest.raises(KeyFileError) as caught:
        keys.create_private_key_file(path)
    assert str(caught.value).startswith(
        f"{path}: cannot create key file (No space left on device); check that {tmp_path}"
    )
    assert entries(tmp_path) == []


def test_create_in_unusable_directory(tmp_path: Path) -> None:
    blocker = write_file(tmp_path / "etc", "a file, not a directory")
    with pytest.raises(KeyFileError, match=f"cannot create directory {blocker}"):
        keys.create_private_key_file(blocker / "private.key")


# --- ensure -----------------------------------------------------------------------------------


def test_ensure_creates_once_then_loads_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    key, created = keys.ensure_private_key_file(path)
    assert created
    again, created_again = keys.ensure_private_key_file(path)
    assert not created_again
    assert again == key
    assert entries(tmp_path) == ["private.key"]


def test_ensure_loads_an_existing_key(tmp_path: Path) -> None:
    path = write_file(tmp_path / "private.key", SECRET_TEXT + "\n")
    assert keys.ensure_private_key_file(path) == (SECRET, False)


def test_ensure_refuses_a_bad_existing_file_instead_of_replacing_it(tmp_path: Path) -> None:
    path = write_file(tmp_path / "private.key", SECRET_TEXT + "\n", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        keys.ensure_private_key_file(path)
    assert path.read_text() == SECRET_TEXT + "\n"


def test_ensure_losing_a_creation_race_uses_the_winners_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_file(tmp_path / "private.key", SECRET_TEXT + "\n")
    # The winner creates the file after we looked and before we link().
    monkeypatch.setattr(os.path, "lexists", lambda _: False)
    assert keys.ensure_private_key_file(path) == (SECRET, False)
    assert entries(tmp_path) == ["private.key"]


# --- interoperability with wireguard-tools ----------------------------------------------------


@pytest.fixture
def wg() -> str:
    path = shutil.which("wg")
    if path is None:
        missing_prerequisite("wg (wireguard-tools) is not installed")
    return path


def run_wg(wg: str, *args: str, stdin: str = "") -> str:
    result = subprocess.run(
        [wg, *args], input=stdin, capture_output=True, text=True, check=True, timeout=10
    )
    return result.stdout.strip()


def test_wg_pubkey_agrees_with_ours(wg: str, tmp_path: Path) -> None:
    key = keys.create_private_key_file(tmp_path / "private.key")
    ours = keys.encode_key(keys.public_key(key))
    assert run_wg(wg, "pubkey", stdin=(tmp_path / "private.key").read_text()) == ours


def test_wg_genkey_key_loads_and_gives_wg_pubkey(wg: str, tmp_path: Path) -> None:
    private_text = run_wg(wg, "genkey")
    path = write_file(tmp_path / "private.key", private_text + "\n")
    key = keys.load_key_file(path)
    assert keys.encode_key(keys.public_key(key)) == run_wg(wg, "pubkey", stdin=private_text)


def test_wg_also_rejects_non_canonical_base64(wg: str) -> None:
    text = keys.encode_key(keys.generate_private_key())
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    # The last character carries 4 key bits and 2 unused bits; set one of the unused ones.
    non_canonical = text[:42] + alphabet[alphabet.index(text[42]) | 1] + "="
    with pytest.raises(ValueError, match="non-canonical"):
        keys.decode_key(non_canonical)
    with pytest.raises(subprocess.CalledProcessError):
        run_wg(wg, "pubkey", stdin=non_canonical)


def test_secret_files_follow_the_key_file_rules(tmp_path: Path) -> None:
    path = write_file(tmp_path / "backend.secret", "s3cret-value\n", 0o600)
    assert keys.read_secret_file(path, what="header secret file") == b"s3cret-value\n"
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600") as caught:
        keys.read_secret_file(path, what="header secret file")
    assert "s3cret" not in str(caught.value)
    with pytest.raises(KeyFileError, match="create the header secret file"):
        keys.read_secret_file(tmp_path / "absent", what="header secret file")


def test_a_symlink_to_a_shared_file_names_the_file_it_points_at(tmp_path: Path) -> None:
    """A key path that links to /etc/shadow (mode 0640): "run: chmod 600 private.key" would
    change /etc/shadow. The message says where the link points and hedges the hint."""
    target = write_file(tmp_path / "shadow", "root:*:19000:0:99999:7:::\n", 0o640)
    link = tmp_path / "private.key"
    link.symlink_to(target)
    with pytest.raises(KeyFileError) as caught:
        keys.load_key_file(link)
    assert str(caught.value) == (
        f"{link}: a symlink to {target}, which is readable by group/other (mode 0640); "
        f"if that file is the key, run: chmod 600 {target}"
    )
