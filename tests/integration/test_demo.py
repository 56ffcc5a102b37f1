"""The README's "run it" command works and cleans up after itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

DEMO = Path(__file__).parents[2] / "scripts" / "demo"


def test_demo_shows_a_request_crossing_the_tunnel_and_leaves_nothing() -> None:
    result = subprocess.run([str(DEMO)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "hello from a 127.0.0.1-only service, through the tunnel" in result.stdout
    assert "198.18.0.2:80 -> Connection refused" in result.stdout
    assert "tunneld ready -> ready" in result.stdout
    assert 'tunneld_peer_up{peer="demo-gateway"} 1.0' in result.stdout
    assert 'tunneld_requests_total{code="200",service="hello"} 1.0' in result.stdout
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "td-demo" not in namespaces
    assert not list(Path("/var/run/wireguard").glob("tddemo*"))
