"""Unit-test set-up shared by every module here."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


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
