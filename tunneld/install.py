"""``tunneld install-systemd``: the unit, the key, a starter config, and the gateway's peer lines.

How this works. Everything is written below a root — ``/``, or ``--root DIR`` for packaging and
tests — and nothing that exists is overwritten, except the unit with a different version of it:

- ``/etc/systemd/system/tunneld.service`` is exactly ``systemd/tunneld.service`` (``UNIT_TEXT``
  at the end of this module; tests/unit/test_install.py keeps the two identical). A re-run
  replaces a different one, which is how an upgrade reaches it; local changes belong in a
  drop-in (``systemctl edit tunneld``).
- The key, ``/var/lib/tunneld/private.key``: 0600 in a 0700 directory, created by
  ``keys.ensure_private_key_file``, never overwritten, so a re-run prints the same public key.
  The unit runs with ``DynamicUser=`` and ``StateDirectory=tunneld``: at the first start systemd
  moves a plain ``/var/lib/tunneld`` to ``/var/lib/private/tunneld`` (leaving a symlink) and
  gives it, key included, to the service's transient user. A key created in a state directory
  that systemd has set up already gets that directory's owner, because systemd re-owns the tree
  only when the directory itself has the wrong owner. (Not a credential: with
  ``private_key_credential``, every ``tunneld -c`` command outside the unit would fail for want
  of ``$CREDENTIALS_DIRECTORY``.)
- The config, ``/etc/tunneld/tunneld.toml``, only if it is missing, mode 0644: it holds no secret
  (keys are files it names), and the dynamic user must read it, which a root-only 0600 or 0640
  file would forbid. What the options do not give is a ``<placeholder>`` that fails validation,
  so ``tunneld check-config`` names each key still to fill in. A complete config is validated
  with ``load_config`` before it is published.

Then it prints the connector's public key and what the gateway operator adds for it (a
``wg-quick`` ``[Peer]`` and a ``wg set`` command), and, without ``--root`` on a host that runs
systemd, runs ``systemctl daemon-reload``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tunneld import keys
from tunneld.config import DEFAULT_CONFIG_PATH, DEFAULT_PRIVATE_KEY_FILE, IPInterface, load_config
from tunneld.config_reader import file_path, quote, read_toml_file
from tunneld.errors import ConfigError, TunneldError
from tunneld.host_port import HostPort
from tunneld.systemd_unit import UNIT_TEXT
from tunneld.wireguard.model import IPAddress

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

UNIT_PATH = Path("/etc/systemd/system/tunneld.service")
#: The program the unit's ExecStart= runs.
UNIT_EXEC_PATH = Path("/usr/local/bin/tunneld")
#: StateDirectory=tunneld, and where systemd keeps it for a DynamicUser= service.
STATE_DIR = DEFAULT_PRIVATE_KEY_FILE.parent
PRIVATE_STATE_DIR = Path("/var/lib/private/tunneld")
#: sd_booted(): the directory exists when systemd is the running init system.
SYSTEMD_RUNTIME_DIR = Path("/run/systemd/system")

#: What the starter config holds where an option was not given: none of them validates.
ADDRESS_PLACEHOLDER = "<tunnel-address>/24"
PUBLIC_KEY_PLACEHOLDER = "<gateway-public-key>"
ENDPOINT_PLACEHOLDER = "<gateway-host>:51820"
GATEWAY_ADDRESS_PLACEHOLDER = "<gateway-tunnel-address>/32"
#: The gateway's WireGuard interface, as the printed commands name it.
GATEWAY_INTERFACE = "wg0"
KEEPALIVE_SECONDS = 25


class UsageProblems(ValueError):
    """The options are not usable; one problem per line, each naming its option."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class InstallRequest:
    """What to install, validated. Paths are on the target system (below ``root``)."""

    root: Path | None  # None: this system, and systemctl is run
    config: Path = DEFAULT_CONFIG_PATH  # absolute
    addresses: tuple[IPInterface, ...] = ()
    gateway_endpoints: tuple[HostPort, ...] = ()
    gateway_public_key: str | None = None  # base64, canonical
    gateway_addresses: tuple[IPAddress, ...] = ()  # empty: inferred from ``addresses``

    def on_disk(self, path: Path) -> Path:
        """Where the target system's ``path`` is on this one."""
        return path if self.root is None else self.root / path.relative_to("/")


def parse_request(
    *,
    root: Path | None,
    config: Path | None = None,
    addresses: Sequence[str] = (),
    gateway_endpoints: Sequence[str] = (),
    gateway_public_key: str | None = None,
    gateway_addresses: Sequence[str] = (),
) -> InstallRequest:
    """The request the command-line options describe; ``UsageProblems`` lists what is wrong."""
    problems: list[str] = []

    def problem(option: str, text: str, message: str) -> None:
        problems.append(f"{option}: {quote(text)} {message}")

    config = config or DEFAULT_CONFIG_PATH
    if not config.is_absolute():
        if root is not None:
            problem("-c", str(config), "is relative: with --root, give its path on the target")
        config = Path.cwd() / config
    own: list[IPInterface] = []
    for text in addresses:
        try:
            address = ipaddress.ip_interface(text)
        except ValueError:
            problem("--address", text, "is not an IP address/prefix, e.g. 10.44.0.2/24")
            continue
        if "/" not in text:
            problem("--address", text, f"has no prefix length, e.g. {text}/24")
        elif any(address.ip == seen.ip for seen in own):
            problem("--address", text, "is given twice")
        else:
            own.append(address)
    endpoints: list[HostPort] = []
    for text in gateway_endpoints:
        try:
            endpoints.append(HostPort.parse(text))
        except ValueError as exc:
            problem("--gateway-endpoint", text, f"is not host:port ({exc})")
    public_key = None
    if gateway_public_key is not None:
        try:
            public_key = keys.encode_key(keys.decode_key(gateway_public_key, what="the value"))
        except ValueError as exc:  # the message does not repeat the value
            where = f"on the gateway, `wg show {GATEWAY_INTERFACE} public-key` prints the key"
            problems.append(f"--gateway-public-key: {exc}; {where}")
    gateway_ips: list[IPAddress] = []
    for text in gateway_addresses:
        try:
            gateway = ipaddress.ip_interface(text)
        except ValueError:
            problem("--gateway-address", text, "is not an IP address, e.g. 10.44.0.1")
            continue
        if gateway.network.prefixlen != gateway.max_prefixlen:
            problem("--gateway-address", text, "is a network; give one address, e.g. 10.44.0.1")
        elif any(gateway.ip == address.ip for address in own):
            problem("--gateway-address", text, "is this connector's own --address")
        else:
            gateway_ips.append(gateway.ip)
    if problems:
        raise UsageProblems(problems)
    return InstallRequest(
        root, config, tuple(own), tuple(endpoints), public_key, tuple(gateway_ips)
    )


def inferred_gateway_addresses(addresses: Sequence[IPInterface]) -> tuple[IPAddress, ...]:
    """The gateway's tunnel address by the usual convention: the first host of each network.

    ``10.44.0.2/24`` → ``10.44.0.1``. None for a network without room for two hosts, or where
    this connector is the first host itself.
    """
    found: list[IPAddress] = []
    for address in addresses:
        network = address.network
        if network.num_addresses < 4:  # /31, /32, /127, /128: no separate network address
            continue
        first = network.network_address + 1
        if first != address.ip:
            found.append(first)
    return tuple(found)


# -- pure renderings ---------------------------------------------------------------------------

_STARTER_CONFIG = """\
# tunneld connector config, written by `tunneld install-systemd`. Every key, its default and its
# meaning: docs/configuration.md. It holds no secret (keys are files it names). Keep it readable
# by all (0644): the service runs as a transient user (DynamicUser=) that must read it.
{header}

[interface]
name = "tunneld0"
# This host's private key, created 0600 by install-systemd. It never leaves this host.
private_key_file = {key_file}
# This connector's tunnel address. The gateway routes it here (its [Peer] AllowedIPs).
{address}

# The WireGuard gateway this connector dials out to (any wg-quick peer; one [[gateway]] table
# per gateway). The gateway adds this connector as a [Peer]: see install-systemd's output.
[[gateway]]
name = "gateway"
{public_key}
# Where the gateway listens (UDP), in failover order.
{endpoints}
# The gateway's own tunnel address (its [Interface] Address): routed into the tunnel, the only
# source allowed to reach the services, and where the health probe goes.
{allowed_ips}
# A keepalive every {keepalive} s keeps the NAT in front of this host open (no one dials in).
persistent_keepalive = {keepalive}

# The local services the gateway may reach (none yet). http services share port 80 of the
# tunnel address and are routed by the Host header the gateway sends; tcp ones get a port each.
# [[service]]
# name = "app"
# hosts = ["app"]
# upstream = "http://127.0.0.1:8080"
#
# [[service]]
# name = "postgres"
# protocol = "tcp"
# listen_port = 5432
# upstream = "tcp://127.0.0.1:5432"

# Prometheus /metrics, /livez, /readyz and /status; this is the default, "off" turns it off.
# [metrics]
# listen = "127.0.0.1:9477"
"""


def render_starter_config(
    request: InstallRequest, key_file: Path = DEFAULT_PRIVATE_KEY_FILE
) -> tuple[str, list[str]]:
    """The starter config's TOML, and the key paths still to fill in (none: it is complete).

    A value that no option gave is a placeholder under a ``# TODO:`` comment, and each
    placeholder fails validation with a message that names its key.
    """
    todo: list[str] = []

    def setting(
        path: str, values: Sequence[object], placeholder: str, hint: str, *, array: bool = True
    ) -> str:
        """``key = [values]``, or the placeholder under a TODO line when there are none."""
        key = path.rpartition(".")[2]
        if not values:
            todo.append(path)
            values, key = [placeholder], f"# TODO: {hint}\n{key}"
        items = [quote(str(value)) for value in values]
        return f"{key} = {'[' + ', '.join(items) + ']' if array else items[0]}"

    gateway_addresses = request.gateway_addresses or inferred_gateway_addresses(request.addresses)
    settings = {
        "address": setting(
            "interface.address", request.addresses, ADDRESS_PLACEHOLDER,
            "a free address, with its prefix, in the gateway's tunnel network, e.g. 10.44.0.2/24",
        ),
        "public_key": setting(
            "gateway[0].public_key",
            [request.gateway_public_key] if request.gateway_public_key else [],
            PUBLIC_KEY_PLACEHOLDER,
            f"the gateway's public key (on the gateway: wg show {GATEWAY_INTERFACE} public-key)",
            array=False,
        ),
        "endpoints": setting(
            "gateway[0].endpoints", request.gateway_endpoints, ENDPOINT_PLACEHOLDER,
            "host:port of the gateway's ListenPort, reachable from here (UDP)",
        ),
        "allowed_ips": setting(
            "gateway[0].allowed_ips",
            [f"{address}/{address.max_prefixlen}" for address in gateway_addresses],
            GATEWAY_ADDRESS_PLACEHOLDER, "the gateway's tunnel address, e.g. 10.44.0.1/32",
        ),
    }  # fmt: skip
    if gateway_addresses and not request.gateway_addresses:
        assumed = "# Assumed: the first address of the tunnel network; correct it if not.\n"
        settings["allowed_ips"] = assumed + settings["allowed_ips"]
    check = f"tunneld check-config -c {shlex.quote(str(request.config))}"
    header = f"# After a change: {check}, then systemctl reload tunneld."
    if todo:
        header = (
            f"# TODO: fill in each <placeholder> below. `{check}`\n# names each key still to fill."
        )
    text = _STARTER_CONFIG.format(
        header=header, key_file=quote(str(key_file)), keepalive=KEEPALIVE_SECONDS, **settings
    )
    return text, todo


_GATEWAY_INSTRUCTIONS = """\
On the gateway, add this connector as a peer of its WireGuard interface ({interface} here), in
/etc/wireguard/{interface}.conf (wg-quick) so that it survives restarts:

[Peer]
# tunneld connector on {host}
PublicKey = {public_key}
AllowedIPs = {allowed_ips}

No Endpoint: the connector dials out, and the gateway learns its address from each handshake
(and follows it when it changes). No PersistentKeepalive either: the connector sends keepalives
({keepalive} s, persistent_keepalive) that keep the NAT on its side open for the gateway's packets.
Apply the file without a restart: wg syncconf {interface} <(wg-quick strip {interface})
or add the peer to the running interface only (gone when it restarts):

  wg set {interface} peer {public_key} allowed-ips {allowed_ips_argument}"""


def gateway_instructions(public_key: str, addresses: Sequence[IPInterface]) -> str:
    """What the gateway operator adds for this connector: a ``[Peer]``, and a ``wg set`` line."""
    allowed = [f"{address.ip}/{address.max_prefixlen}" for address in addresses]
    allowed = allowed or ["<tunnel-address>/32"]
    return _GATEWAY_INSTRUCTIONS.format(
        interface=GATEWAY_INTERFACE,
        host=socket.gethostname(),
        public_key=public_key,
        allowed_ips=", ".join(allowed),
        allowed_ips_argument=",".join(allowed),
        keepalive=KEEPALIVE_SECONDS,
    )


# -- the installation --------------------------------------------------------------------------


@dataclass(frozen=True)
class _ExistingConfig:
    """What install needs of a config that is there already (and is kept as it is)."""

    key_file: Path | None  # on the target system; None when the key is a credential
    credential: str | None
    addresses: tuple[IPInterface, ...]
    problem: str | None = None  # why it could not be read


def install_systemd(request: InstallRequest, out: TextIO | None = None) -> int:
    """Install as the module docstring says, print what was done; return the exit code."""
    out = sys.stdout if out is None else out
    if request.root is None and os.geteuid() != 0:
        _error(
            f"must run as root: it writes {UNIT_PATH}, {request.config} and {STATE_DIR}; "
            "or give --root DIR to write below DIR"
        )
        return EXIT_USAGE
    try:
        return _install(request, out)
    except TunneldError as exc:  # a bad key file, or a generated config that does not validate
        for line in str(exc).splitlines():
            _error(line)
        return exc.exit_code
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"{where}{exc.strerror or exc}")
        return EXIT_USAGE if isinstance(exc, PermissionError) else EXIT_FAILURE


def _install(request: InstallRequest, out: TextIO) -> int:
    def done(path: Path, what: str) -> None:
        print(f"  {path}: {what}", file=out)

    below = f" (below {request.root})" if request.root else ""
    print(f"tunneld install-systemd{below}:", file=out)
    done(request.on_disk(UNIT_PATH), _write_unit(request))

    config_path = request.on_disk(request.config)
    existing = None
    if os.path.lexists(config_path):
        existing = _read_existing(config_path, request.config)
    public_key = None
    if existing is not None and existing.credential is not None:
        credential = quote(existing.credential)
        print(f"  the key: systemd credential {credential} (not created here)", file=out)
    else:
        key_file = existing.key_file if existing and existing.key_file else DEFAULT_PRIVATE_KEY_FILE
        key_path, key, created = _ensure_key(request, key_file)
        public_key = keys.encode_key(keys.public_key(key))
        done(key_path, "created (0600)" if created else "kept: a key is never overwritten")

    todo: list[str] = []
    if existing is None:
        text, todo = render_starter_config(request)
        if _publish_config(request, text, complete=not todo):
            to_fill = f"; to fill in: {', '.join(todo)}" if todo else ""
            done(config_path, f"written (0644){to_fill}")
        else:  # created by someone else meanwhile
            existing, todo = _read_existing(config_path, request.config), []
    if existing is not None:
        done(config_path, "kept: a config is never overwritten")
        if existing.problem:
            print(f"    ({existing.problem})", file=out)
        given = request.addresses or request.gateway_endpoints or request.gateway_public_key
        if given or request.gateway_addresses:
            print("    (so --address and the --gateway-* options were not applied)", file=out)

    status = EXIT_OK
    if request.root is None:
        status = _reload_systemd(out)
    _print_next_steps(request, existing, public_key, todo, out)
    return status


def _print_next_steps(
    request: InstallRequest,
    existing: _ExistingConfig | None,
    public_key: str | None,
    todo: Sequence[str],
    out: TextIO,
) -> None:
    addresses = existing.addresses if existing is not None else request.addresses
    if public_key is not None:
        print(f"\nThis connector's public key: {public_key}\n", file=out)
        print(gateway_instructions(public_key, addresses), file=out)
    config = shlex.quote(str(request.config))
    check = [f"tunneld check-config -c {config}"]
    if todo:
        steps = [(f"Fill in {request.config}: {', '.join(todo)}. This names what is left:", check)]
    else:
        steps = [(f"Add [[service]] tables to {request.config} and check it:", check)]
    if public_key is not None:
        steps.append(("Add the [Peer] above on the gateway (docs/gateway-setup.md).", []))
    if request.config != DEFAULT_CONFIG_PATH:
        exec_start = f"ExecStart={UNIT_EXEC_PATH} run -c {request.config}"
        text = f"The unit reads {DEFAULT_CONFIG_PATH}; for this one, `systemctl edit tunneld`:"
        steps.append((text, ["[Service]", "ExecStart=", exec_start]))
    if request.root is None and not UNIT_EXEC_PATH.exists():
        program = shutil.which("tunneld") or "/path/to/tunneld"
        text = f"The unit runs {UNIT_EXEC_PATH}, which is missing:"
        steps.append((text, [f"ln -s {program} {UNIT_EXEC_PATH}"]))
    start = ["systemctl enable --now tunneld", "tunneld status"]
    if request.root is not None:
        start.insert(0, "systemctl daemon-reload")
    steps.append(("Start it, then see the tunnel:", start))
    print("\nNext:", file=out)
    for number, (text, commands) in enumerate(steps, 1):
        indent = f"  {number}. "
        print(textwrap.fill(text, 96, initial_indent=indent, subsequent_indent="     "), file=out)
        for command in commands:
            print(f"       {command}", file=out)


def _read_existing(path: Path, target: Path) -> _ExistingConfig:
    """The key location and addresses of the config at ``path`` (``target`` on the target)."""
    try:
        raw = read_toml_file(path, str(path)) or {}
    except ConfigError as exc:
        problem = f"{exc}; the key used is {DEFAULT_PRIVATE_KEY_FILE}"
        return _ExistingConfig(DEFAULT_PRIVATE_KEY_FILE, None, (), problem)
    interface = raw.get("interface")
    table = interface if isinstance(interface, dict) else {}
    addresses = []
    listed = table.get("address")
    for text in listed if isinstance(listed, list) else []:
        if isinstance(text, str) and "/" in text:
            try:
                addresses.append(ipaddress.ip_interface(text))
            except ValueError:
                continue
    credential = table.get("private_key_credential")
    if isinstance(credential, str):
        return _ExistingConfig(None, credential, tuple(addresses))
    key_file = DEFAULT_PRIVATE_KEY_FILE
    text = table.get("private_key_file")
    if isinstance(text, str):
        with contextlib.suppress(ValueError):  # the config's own problem: check-config says it
            key_file = file_path(text, target.parent)
    return _ExistingConfig(key_file, None, tuple(addresses))


def _write_unit(request: InstallRequest) -> str:
    """Write the unit unless it is there already, byte for byte; say what was done."""
    path = request.on_disk(UNIT_PATH)
    wanted = UNIT_TEXT.encode()
    try:
        current: bytes | None = path.read_bytes()
    except FileNotFoundError:
        current = None
    if current == wanted:
        return "unchanged"
    _make_directory(path.parent, 0o755)
    temporary = _temporary_file(path, wanted, 0o644)
    try:
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    if current is None:
        return "written"
    return "replaced a different version (local changes belong in `systemctl edit tunneld`)"


def _ensure_key(request: InstallRequest, key_file: Path) -> tuple[Path, bytes, bool]:
    """The key at ``key_file`` (created if missing): where it is here, the key, and if created."""
    if key_file.parent == STATE_DIR:
        directory = _state_directory(request)
    else:
        directory = request.on_disk(key_file.parent)
    path = directory / key_file.name
    key, created = keys.ensure_private_key_file(path)
    if created and os.geteuid() == 0:
        # In a state directory that systemd has already given to the service's user, a root-owned
        # key would stay root's: systemd re-owns the tree only if the directory's owner is wrong.
        info = directory.stat()
        os.chown(path, info.st_uid, info.st_gid)
    return path, key, created


def _state_directory(request: InstallRequest) -> Path:
    """The directory of the key: /var/lib/tunneld, which systemd makes private at first start."""
    public, private = request.on_disk(STATE_DIR), request.on_disk(PRIVATE_STATE_DIR)
    if os.path.lexists(public):
        return public  # a directory, or systemd's symlink to private/tunneld
    if private.is_dir():
        return private  # systemd puts the symlink back at the next start
    _make_directory(public, 0o700)  # StateDirectoryMode=0700
    return public


def _publish_config(request: InstallRequest, text: str, *, complete: bool) -> bool:
    """Create the config with ``text`` (validated first if ``complete``); False if it exists."""
    path = request.on_disk(request.config)
    _make_directory(path.parent, 0o755)  # ConfigurationDirectoryMode=0755
    temporary = _temporary_file(path, text.encode(), 0o644)
    try:
        if complete:
            try:
                load_config(temporary, environ={})
            except ConfigError as exc:  # a bug in render_starter_config, or a corner it missed
                named = [problem.replace(str(temporary), str(path)) for problem in exc.problems]
                raise ConfigError(named) from None
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return True


def _make_directory(path: Path, mode: int) -> None:
    """Create ``path`` with exactly ``mode`` if it is missing; an existing one is left as it is."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        return
    path.chmod(mode)  # whatever the umask


def _temporary_file(path: Path, data: bytes, mode: int) -> Path:
    """A new file next to ``path`` holding ``data`` (fsynced, exactly ``mode``), to be renamed."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return temporary


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reload_systemd(out: TextIO) -> int:
    """``systemctl daemon-reload`` if systemd runs this system; nothing systemd-ish otherwise."""
    if not SYSTEMD_RUNTIME_DIR.is_dir():
        print(f"  systemd: not running here (no {SYSTEMD_RUNTIME_DIR}): no daemon-reload", file=out)
        return EXIT_OK
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        _error("systemd runs, but systemctl is not on PATH: run systemctl daemon-reload yourself")
        return EXIT_FAILURE
    try:
        result = subprocess.run(
            [systemctl, "daemon-reload"], capture_output=True, text=True, timeout=120, check=False
        )
    except subprocess.TimeoutExpired:
        _error("systemctl daemon-reload did not finish within 120 s; run it again")
        return EXIT_FAILURE
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        _error(f"systemctl daemon-reload failed (exit {result.returncode}): {detail}")
        return EXIT_FAILURE
    print("  systemd: systemctl daemon-reload done", file=out)
    return EXIT_OK


def _error(message: str) -> None:
    print(f"tunneld install-systemd: {message}", file=sys.stderr)
