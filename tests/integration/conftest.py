from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.integration.topology import Topology

FAILED_KEY = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[FAILED_KEY] = True
    return report


@pytest.fixture
def topology(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Topology]:
    """Gateway and host namespaces with a running stock WireGuard gateway; torn down always."""
    topo = Topology(tmp_path)
    try:
        topo.build()
        topo.start_gateway()
        topo.write_config()
        yield topo
    finally:
        topo.close()
        if request.node.stash.get(FAILED_KEY, False):
            # The daemons' own account is what explains a failure seen only in CI.
            for log in sorted(tmp_path.glob("*.log")):
                print(f"===== {log.name} =====\n{log.read_text(errors='replace')}")
