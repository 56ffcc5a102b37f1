"""bench.micro runs its three paths end to end (a smoke test: no figures are asserted)."""

from __future__ import annotations

import pytest

from bench import micro


def test_every_path_carries_its_requests(capsys: pytest.CaptureFixture[str]) -> None:
    assert micro.main(["--connections", "3", "--requests", "20", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["direct", "60"],
        ["http", "60"],
        ["tcp", "60"],
    ]
    assert "proxy adds" in lines[1]


def test_an_unknown_path_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        micro.main(["--paths", "direct,htp"])
    assert exit_info.value.code == 2
    assert "unknown htp" in capsys.readouterr().err
