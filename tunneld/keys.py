"""WireGuard keys: generation, base64 text, and private-key files.

Keys are 32 raw bytes inside tunneld; base64 (44 characters, exactly what ``wg genkey`` prints)
exists only in files and config. Decoding is strict: one canonical base64 key, surrounding
whitespace ignored, so a key we accept is one ``wg`` accepts too.

A key file is loaded only if it is a regular file no one but its owner can read or write. The mode
is checked with ``fstat`` on the descriptor we read from, so the file cannot be swapped between
check and read. Symlinks are followed (systemd credentials and Kubernetes secrets are symlinks):
what is checked is the file they point at. The content is read only after the mode check passes.

A new key file is written in full to a temporary file in the same directory (mode 0600, fsynced),
then published with ``link()``, which fails if the name exists. So a reader never sees half a key,
an existing key is never overwritten, and when two processes race to create the file both end up
with the winner's key. The directory is fsynced so the new name survives a crash.

``check_private_key_file`` tells what ``ensure_private_key_file`` would do without doing it
(``tunneld check-config``), and ``load_header_secret`` reads a ``require_header`` secret,
refusing one that no request could carry.

Key material never appears in messages, exception arguments or tracebacks, and this module logs
nothing.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import secrets
import shlex
import stat
from pathlib import Path

from tunneld import x25519
from tunneld.errors import KeyFileError
from tunneld.wireguard.model import KEY_LEN

#: A key file holds 45 bytes; anything larger than this is not a key file.
MAX_KEY_FILE_BYTES = 4096


def generate_private_key() -> bytes:
    """Return a new random private key, clamped exactly as ``wg genkey`` clamps it."""
    key = bytearray(secrets.token_bytes(KEY_LEN))
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


def public_key(private_key: bytes) -> bytes:
    """Return the X25519 public key of *private_key*."""
    _check_length(private_key)
    return x25519.public_key(private_key)


def encode_key(key: bytes) -> str:
    """Return *key* as ``wg`` writes it: 44 characters of standard base64, no newline."""
    _check_length(key)
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str, *, what: str = "key") -> bytes:
    """Return the key in *text* (base64, surrounding whitespace ignored).

    Raises ``ValueError`` saying what is wrong, in terms of *what*; the message never contains
    *text*, which may be a secret.
    """
    key, problem = _decode(text)
    if problem:
        raise ValueError(f"{what} is not a WireGuard key ({problem})")
    return key


def load_key_file(path: Path, *, what: str = "private key") -> bytes:
    """Return the key stored in *path*.

    Raises ``KeyFileError`` naming the file and the fix if it is missing, unreadable, not a
    regular file, readable or writable by group/other, too large, or does not hold one key.
    """
    quoted = shlex.quote(str(path))
    content = read_secret_file(path, what=f"{what} file", missing_hint=_fix_hint(quoted, what))
    # Undecodable bytes become U+FFFD, which the strict base64 check rejects without echoing them.
    key, problem = _decode(content.decode("ascii", errors="replace"))
    if problem:
        raise KeyFileError(f"{path}: not a WireGuard {what} ({problem}); {_fix_hint(quoted, what)}")
    return key


def read_secret_file(path: Path, *, what: str = "secret file", missing_hint: str = "") -> bytes:
    """Return the content of *path*, a small regular file that only its owner may use.

    The same rules as key files (mode check on the open descriptor, size cap, no FIFOs), for
    any secret: a key, or a shared-secret header value. Errors never contain the content.
    """
    quoted = shlex.quote(str(path))
    try:
        # O_NONBLOCK: opening a FIFO must not hang; it is refused below as not a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        if path.is_symlink():
            raise KeyFileError(f"{path}: is a symlink to a missing file; fix the link") from None
        hint = f"; {missing_hint}" if missing_hint else f"; create the {what} (mode 600)"
        raise KeyFileError(f"{path}: does not exist{hint}") from None
    except PermissionError:
        raise KeyFileError(
            f"{path}: permission denied; tunneld runs as uid {os.geteuid()}: make the file "
            f"and its directories accessible to that user, e.g. chown {os.geteuid()} {quoted}"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot open ({exc.strerror}); check the path") from exc
    try:
        return _read_owner_only_file(fd, path, what)
    finally:
        os.close(fd)


def load_header_secret(path: Path) -> bytes:
    """Return the shared secret in *path* (a ``require_header`` value), surrounding whitespace
    removed; the file follows the rules of ``read_secret_file``.

    Raises ``KeyFileError`` if no request could carry it: empty, or with a control character
    (a line break inside it, say), which a header value cannot hold.
    """
    secret = read_secret_file(path, what="header secret file").strip()
    if not secret:
        raise KeyFileError(f"{path}: is empty; put the shared secret in it (one line)")
    if any((byte < 0x20 and byte != 0x09) or byte == 0x7F for byte in secret):
        raise KeyFileError(
            f"{path}: the secret contains a control character (a line break?), which a "
            "header value cannot hold; put the secret on one line"
        )
    return secret


def create_private_key_file(path: Path) -> bytes:
    """Create *path* holding a new private key (mode 0600) and return the key.

    Never overwrites: raises ``KeyFileError`` if *path* exists (even as a dangling symlink).
    """
    key = _create(path)
    if key is None:
        raise KeyFileError(
            f"{path}: already exists; refusing to overwrite a key file "
            "(delete it first if you really want a new key)"
        )
    return key


def ensure_private_key_file(path: Path) -> tuple[bytes, bool]:
    """Return ``(key, created)``: the key in *path*, creating the file first if it is missing."""
    if not os.path.lexists(path):
        key = _create(path)
        if key is not None:
            return key, True
        # Another process created it between our check and our link(): use the winner's key.
    return load_key_file(path), False


def check_private_key_file(path: Path) -> bool:
    """Check *path* as ``ensure_private_key_file`` would use it, but create nothing.

    Returns True if the file is missing and could be created, False if it holds a usable key
    (loaded and dropped: never returned). Raises the ``KeyFileError`` that
    ``ensure_private_key_file`` would raise, with the same message.
    """
    if os.path.lexists(path):
        load_key_file(path)
        return False
    problem = _creation_problem(path)
    if problem:
        raise KeyFileError(problem)
    return True


def _creation_problem(path: Path) -> str:
    """What ``_create`` would fail with, found without creating anything; "" if nothing."""
    directory = path.parent
    existing = directory
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():  # mkdir() of the directory below it would fail
        error = errno.EEXIST if existing == directory else errno.ENOTDIR
        return (
            f"{path}: cannot create directory {directory} ({os.strerror(error)}); "
            "create it (mode 700) or choose another path"
        )
    if os.access(existing, os.W_OK | os.X_OK, effective_ids=True):
        return ""
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    reason = os.strerror(errno.EROFS if read_only else errno.EACCES)
    if existing != directory:
        return (
            f"{path}: cannot create directory {directory} ({reason}); "
            "create it (mode 700) or choose another path"
        )
    return (
        f"{path}: cannot create key file ({reason}); "
        f"check that {directory} is a writable directory with free space"
    )


def _create(path: Path) -> bytes | None:
    """Create *path* with a new key and return the key; ``None`` if *path* already exists."""
    directory = path.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(
            f"{path}: cannot create directory {directory} ({exc.strerror}); "
            "create it (mode 700) or choose another path"
        ) from exc

    key = generate_private_key()
    temporary = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
            _write_all(fd, (encode_key(key) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return None
        _fsync_directory(directory)
    except OSError as exc:
        raise KeyFileError(
            f"{path}: cannot create key file ({exc.strerror}); "
            f"check that {directory} is a writable directory with free space"
        ) from exc
    finally:
        with contextlib.suppress(OSError):  # best effort: the original error matters more
            temporary.unlink(missing_ok=True)
    return key


def _read_owner_only_file(fd: int, path: Path, what: str) -> bytes:
    """Return the content of *fd*: a small regular file that only its owner can use."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: not a regular file; point it at the {what} itself")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        access = "readable" if mode & 0o044 else "writable"
        if not path.is_symlink():
            raise KeyFileError(
                f"{path}: {access} by group/other (mode {mode:04o}); "
                f"run: chmod 600 {shlex.quote(str(path))}"
            )
        # chmod follows the link: name the file it would change (/etc/shadow, say).
        target = _opened_path(fd, path)
        raise KeyFileError(
            f"{path}: a symlink to {target}, which is {access} by group/other "
            f"(mode {mode:04o}); if that file is the key, run: chmod 600 {shlex.quote(target)}"
        )
    too_large = (
        f"{path}: too large for a {what} (at most {MAX_KEY_FILE_BYTES} bytes); check the path"
    )
    if info.st_size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(too_large)
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := os.read(fd, MAX_KEY_FILE_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_KEY_FILE_BYTES:  # it grew after fstat
                raise KeyFileError(too_large)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read ({exc.strerror}); check the file") from exc
    return b"".join(chunks)


def _opened_path(fd: int, path: Path) -> str:
    """The file that *fd* is open on (where the symlink *path* led when it was opened)."""
    try:
        return str(Path(f"/proc/self/fd/{fd}").readlink())
    except OSError:  # no /proc: resolve the name again
        return str(path.resolve())


def _decode(text: str) -> tuple[bytes, str]:
    """Return ``(key, "")``, or ``(b"", why there is no key)`` phrased without quoting *text*.

    Returning the reason rather than raising keeps the base64 error out of any exception chain.
    """
    stripped = text.strip()
    if not stripped:
        return b"", "empty"
    try:
        key = base64.b64decode(stripped, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        return b"", "not valid base64; a key is 44 characters ending in '='"
    if len(key) != KEY_LEN:
        return b"", f"decodes to {len(key)} bytes, expected {KEY_LEN}"
    if base64.b64encode(key) != stripped.encode("ascii"):
        return b"", "non-canonical base64: unused bits of the last character are set; wg rejects it"
    return key, ""


def _fix_hint(quoted_path: str, what: str) -> str:
    if "private" in what:
        return f"generate one with: (umask 077; tunneld genkey > {quoted_path})"
    return "it must hold one base64 WireGuard key (44 characters ending in '='), as wg prints it"


def _check_length(key: bytes) -> None:
    if len(key) != KEY_LEN:
        raise ValueError(f"a WireGuard key is {KEY_LEN} bytes, got {len(key)}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
