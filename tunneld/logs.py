"""Logging set-up: one event per line on stderr (journald adds its own timestamps)."""

from __future__ import annotations

import logging
import os
import sys

LEVELS = ("debug", "info", "warning", "error")


def configure(level: str | None = None) -> None:
    """Configure the root logger from ``level`` or ``$TUNNELD_LOG_LEVEL`` (default info)."""
    name = (level or os.environ.get("TUNNELD_LOG_LEVEL") or "info").lower()
    if name not in LEVELS:
        name = "info"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(name.upper())
    # pyroute2 logs every netlink message it receives at DEBUG, and a WireGuard dump carries the
    # device's private key: its loggers stay at WARNING whatever our level is.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
