"""Reloading the config in place (SIGHUP, ``tunneld reload``, ``systemctl reload``).

A reload reads and validates the whole file again, then reads the keys and secrets it names;
any problem rejects the new config whole and the running one stays. Otherwise the tunnel and the
proxy each apply only what changed (see :meth:`Tunnel.reconfigure` and
:meth:`Proxy.reconfigure`): peers that stay keep their sessions, and connections — including
those of a service that changed — are never cut.

A few settings cannot change under a running interface; a config that changes them is rejected
with the instruction to restart.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

import trio

from tunneld.config import Config
from tunneld.errors import TunneldError
from tunneld.tunnel import TunnelKeys, load_tunnel_keys

log = logging.getLogger(__name__)

#: What only a restart can change: (what to call it, how to read it from a config).
RESTART_ONLY: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("interface.name", lambda config: config.interface.name),
    ("interface.backend", lambda config: config.interface.backend),
    ("interface.userspace_binary", lambda config: config.interface.userspace_binary),
    ("metrics.listen", lambda config: config.metrics.listen),
)


class ReloadRejected(TunneldError):
    """The new config was not applied; the running one stays."""


def needs_restart(old: Config, new: Config) -> list[str]:
    """The restart-only settings that differ between ``old`` and ``new``."""
    return [name for name, read in RESTART_ONLY if read(old) != read(new)]


def describe_changes(old: Config, new: Config) -> list[str]:
    """What differs, in an operator's words: sections, and gateways and services by name."""
    changes = [
        f"[{section}] changed"
        for section in ("interface", "health", "proxy", "metrics")
        if getattr(old, section) != getattr(new, section)
    ]
    for kind, before, after in (
        ("gateway", {g.name: g for g in old.gateways}, {g.name: g for g in new.gateways}),
        ("service", {s.name: s for s in old.services}, {s.name: s for s in new.services}),
    ):
        changes += [f"{kind} {name} added" for name in after if name not in before]
        changes += [f"{kind} {name} removed" for name in before if name not in after]
        changes += [
            f"{kind} {name} changed"
            for name in after
            if name in before and after[name] != before[name]
        ]
    return changes


class Reconfigurable(Protocol):
    async def reconfigure(self, config: Config, tunnel_keys: TunnelKeys) -> None: ...


class ReconfigurableProxy(Protocol):
    async def reconfigure(self, config: Config, secrets: Mapping[str, bytes]) -> None: ...


class Notifier(Protocol):
    def reloading(self, status: str | None = None) -> None: ...

    def ready_after_reload(self, status: str | None = None) -> None: ...


@dataclasses.dataclass
class ReloadResults:
    """What reloads have done so far (for logs, status and metrics)."""

    succeeded: int = 0
    failed: int = 0
    last_error: str | None = None


class Reloader:
    """Applies a re-read config to the running tunnel and proxy; one reload at a time."""

    def __init__(
        self,
        config: Config,
        *,
        load_config: Callable[[], Config],
        load_secrets: Callable[[Config], Mapping[str, bytes]],
        tunnel: Reconfigurable,
        proxy: ReconfigurableProxy,
        notifier: Notifier,
        status_line: Callable[[], str] = lambda: "",
    ) -> None:
        self.config = config
        self.results = ReloadResults()
        self._load_config = load_config
        self._load_secrets = load_secrets
        self._tunnel = tunnel
        self._proxy = proxy
        self._notifier = notifier
        self._status_line = status_line
        self._lock = trio.Lock()

    async def reload(self) -> bool:
        """Re-read the config and apply it; False if it was rejected or could not be applied.

        Never raises but ``Cancelled``: every failure is logged and counted.
        """
        async with self._lock:
            self._notifier.reloading("reloading the config")
            try:
                await self._reload()
            except TunneldError as exc:
                self.results.failed += 1
                self.results.last_error = str(exc)
                for line in str(exc).splitlines():
                    log.error("reload: %s", line)
                if isinstance(exc, ReloadRejected):
                    log.error("reload rejected: still running the previous config")
                ok = False
            except Exception as exc:  # a bug: say so loudly, but a reload must not end the daemon
                log.exception("reload failed unexpectedly")
                self.results.failed += 1
                self.results.last_error = f"unexpected error: {exc!r}"
                ok = False
            else:
                self.results.succeeded += 1
                self.results.last_error = None
                ok = True
            self._notifier.ready_after_reload(self._status_line())
            return ok

    def _read(self, old: Config) -> tuple[Config, TunnelKeys, Mapping[str, bytes]]:
        """The new config with its keys and secrets, all read before anything is touched."""
        new = self._load_config()
        blocked = needs_restart(old, new)
        if blocked:
            raise TunneldError(
                f"{', '.join(blocked)} changed, which needs a restart (`systemctl restart tunneld`)"
            )
        return new, load_tunnel_keys(new, create_missing=False), self._load_secrets(new)

    async def _reload(self) -> None:
        old = self.config
        try:
            new, tunnel_keys, secrets = await trio.to_thread.run_sync(self._read, old)
        except TunneldError as exc:
            raise ReloadRejected(str(exc)) from exc
        changes = describe_changes(old, new)
        try:
            await self._tunnel.reconfigure(new, tunnel_keys)
            self.config = new
            await self._proxy.reconfigure(new, secrets)
        except TunneldError as exc:
            raise TunneldError(
                f"the new config was only partly applied: {exc}; fix the cause and reload again"
            ) from exc
        log.info("reloaded the config from %s: %s", new.source, "; ".join(changes) or "no changes")
