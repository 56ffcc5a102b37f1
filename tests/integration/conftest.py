from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.topology import Topology


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    """Gateway and host namespaces with a running stock WireGuard gateway; torn down always."""
    topo = Topology(tmp_path)
    try:
        topo.build()
        topo.start_gateway()
        topo.write_config()
        yield topo
    finally:
        topo.close()
