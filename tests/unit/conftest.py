"""Unit-test set-up shared by every module here."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tunneld import tunnel
from tunneld.wireguard.firewall import FilterPlan


@pytest.fixture(autouse=True)
def _restore_root_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``logs.configure`` (run by every ``cli.main``) replaces the root logger's handlers with
    one on the test's captured stderr; put pytest's back so later tests do not log into a
    closed stream."""
    monkeypatch.delenv("TUNNELD_LOG_LEVEL", raising=False)
    monkeypatch.delenv("TUNNELD_LOG_FORMAT", raising=False)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@dataclass
class FakeFirewall:
    """Stands in for the nftables table: what was installed, per interface name."""

    tables: dict[str, FilterPlan] = field(default_factory=dict)
    installs: list[FilterPlan] = field(default_factory=list)

    async def install(self, plan: FilterPlan) -> None:
        self.tables[plan.ifname] = plan
        self.installs.append(plan)

    async def remove(self, ifname: str) -> bool:
        return self.tables.pop(ifname, None) is not None

    async def installed(self, ifname: str) -> bool:
        return ifname in self.tables


@pytest.fixture(autouse=True)
def fake_firewall(monkeypatch: pytest.MonkeyPatch) -> FakeFirewall:
    """No unit test touches the nftables of the machine it runs on (tests may run as root)."""
    fake = FakeFirewall()
    monkeypatch.setattr(tunnel, "install_filter", fake.install)
    monkeypatch.setattr(tunnel, "remove_filter", fake.remove)
    monkeypatch.setattr(tunnel, "filter_installed", fake.installed)
    return fake
