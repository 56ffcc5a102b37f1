"""The docs keep up with the code: every config key, CLI sub-command, option and metric is there.

Sources of truth, not lists kept by hand:

- config keys: what ``Table.done`` accepts as known, recorded while ``load_config`` reads probe
  configs that make every section read every key it has (a service with an invalid protocol
  reads them all), so a key added to ``tunneld/config*.py`` shows up here by itself;
- the CLI: ``tunneld.cli._parser()``, its sub-commands and each one's options;
- metrics: the ``tunneld_*`` names in ``tunneld/metrics.py``.

Each check is a function of the document's text, and the tests at the end delete a line from a
real document to show that the check notices.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunneld.cli import _parser
from tunneld.config import load_config
from tunneld.config_reader import Table
from tunneld.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIG_DOC = REPO / "docs" / "configuration.md"
README = REPO / "README.md"

Section = tuple[str, ...]  # ("interface",), ("service", "tls"); () is the top level

# Every section present, so every reader runs; invalid values are fine, only the reads count.
PROBE_CONFIGS = [
    """
    [interface]
    [health]
    [proxy]
    [metrics]
    [[gateway]]
    [[service]]
    protocol = "neither"  # an invalid protocol: every key of either protocol is read
    upstream = "https://origin.internal:8443"
    [service.require_header]
    [service.tls]
    """,
    """
    [[service]]
    protocol = "http"
    [[service]]
    protocol = "tcp"
    """,
]


# -- config keys -------------------------------------------------------------------------------


def accepted_config_keys(tmp_path: Path) -> dict[Section, set[str]]:
    """Each section's keys, as the config reader accepts them."""
    accepted: dict[Section, set[str]] = defaultdict(set)
    done = Table.done

    def recording_done(table: Table) -> None:
        section = tuple(part for part in table.path if isinstance(part, str))
        accepted[section].update(table.known)
        done(table)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Table, "done", recording_done)
        for index, text in enumerate(PROBE_CONFIGS):
            path = tmp_path / f"probe-{index}.toml"
            path.write_text("\n".join(line.strip() for line in text.splitlines()))
            with contextlib.suppress(ConfigError):
                load_config(path, environ={})
    return dict(accepted)


def doc_sections(markdown: str) -> dict[Section, str]:
    """The text under each heading that names a table (`` `[x]` ``, `` `[[x]]` ``, `` `[x.y]` ``),
    up to the next heading of any level."""
    parts = re.split(r"^(#{1,6} .*)$", markdown, flags=re.MULTILINE)
    sections = {}
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        match = re.search(r"`\[\[?([a-z_.]+)\]?\]`", heading)
        if match:
            sections[tuple(match[1].split("."))] = body
    return sections


def documented_keys(body: str) -> set[str]:
    """The first column of every table whose header starts with ``| key |``."""
    keys: set[str] = set()
    in_key_table = False
    for line in body.splitlines():
        if not line.startswith("|"):
            in_key_table = False
            continue
        first = line.strip("|").split("|")[0].strip()
        if first == "key":
            in_key_table = True
        elif in_key_table and (match := re.fullmatch(r"`\[?([a-z_.]+)\]?`", first)):
            keys.add(match[1].rpartition(".")[2])  # `[service.tls]` documents the key tls
    return keys


def config_doc_problems(accepted: dict[Section, set[str]], markdown: str) -> list[str]:
    sections = doc_sections(markdown)
    problems = []
    for section, keys in sorted(accepted.items()):
        if not section:  # the top level: each key is a table with a section of its own
            problems += [f"[{key}]: no section" for key in sorted(keys) if (key,) not in sections]
            continue
        name = ".".join(section)
        if section not in sections:
            problems.append(f"[{name}]: no section")
            continue
        documented = documented_keys(sections[section])
        problems += [f"[{name}] {key}: not in its key table" for key in sorted(keys - documented)]
        problems += [f"[{name}] {key}: documented, not accepted" for key in documented - keys]
    return problems


@pytest.fixture(scope="module")
def accepted(tmp_path_factory: pytest.TempPathFactory) -> dict[Section, set[str]]:
    return accepted_config_keys(tmp_path_factory.mktemp("probes"))


def test_the_probes_reach_every_section(accepted: dict[Section, set[str]]) -> None:
    expected = {"interface", "gateway", "health", "proxy", "service", "metrics"}
    assert accepted[()] >= expected
    assert set(accepted) >= {(name,) for name in expected} | {
        ("service", "require_header"),
        ("service", "tls"),
    }
    assert {"listen_port", "hosts", "response_timeout"} <= accepted[("service",)]


def test_every_config_key_is_in_docs_configuration_md(accepted: dict[Section, set[str]]) -> None:
    assert config_doc_problems(accepted, CONFIG_DOC.read_text()) == []


# -- the command line --------------------------------------------------------------------------


def cli_section(readme: str) -> str:
    match = re.search(r"^## Command line.*?$(.*?)(?=^## )", readme, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Command line' section"
    return match[1]


def mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if action.option_strings and "--help" not in action.option_strings:
            yield action


def cli_doc_problems(parser: argparse.ArgumentParser, readme: str) -> list[str]:
    section = cli_section(readme)
    rows = [line for line in section.splitlines() if line.startswith("|")]
    problems = []
    for action in options(parser):
        if not any(mentions(section, option) for option in action.option_strings):
            problems.append(f"{action.option_strings[-1]}: not in the README's CLI reference")
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in commands.choices.items():
        own = [row for row in rows if re.search(rf"`tunneld {re.escape(name)}[ `]", row)]
        if not own:
            problems.append(f"tunneld {name}: no row in the README's CLI reference")
            continue
        for action in options(sub):
            if not any(mentions(row, option) for row in own for option in action.option_strings):
                problems.append(f"tunneld {name} {action.option_strings[-1]}: not in its row")
    return problems


def test_every_command_and_option_is_in_the_readme() -> None:
    assert cli_doc_problems(_parser(), README.read_text()) == []


# -- metrics -----------------------------------------------------------------------------------


def metric_names() -> set[str]:
    source = (REPO / "tunneld" / "metrics.py").read_text()
    return set(re.findall(r'"(tunneld_[a-z_]+)"', source))


def metrics_doc_problems(names: set[str], readme: str) -> list[str]:
    return [f"{name}: not in the README" for name in sorted(names) if f"`{name}`" not in readme]


def test_every_metric_is_in_the_readme() -> None:
    names = metric_names()
    assert {"tunneld_requests_total", "tunneld_peer_up"} <= names
    assert metrics_doc_problems(names, README.read_text()) == []


# -- the checks notice an omission -------------------------------------------------------------


def without_line(text: str, pattern: str) -> str:
    lines = text.splitlines(keepends=True)
    kept = [line for line in lines if not re.search(pattern, line)]
    assert len(kept) == len(lines) - 1, f"{pattern!r} must match exactly one line"
    return "".join(kept)


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        (r"^\| `mtu` \|", "[interface] mtu: not in its key table"),
        (r"^\| `probe_address` \|", "[gateway] probe_address: not in its key table"),
        (r"^\| `forward` \|", "[service.require_header] forward: not in its key table"),
        (r"^## `\[metrics\]`", "[metrics]: no section"),
    ],
)
def test_a_missing_config_key_is_noticed(
    accepted: dict[Section, set[str]], pattern: str, problem: str
) -> None:
    assert problem in config_doc_problems(accepted, without_line(CONFIG_DOC.read_text(), pattern))


def test_a_documented_key_that_does_not_exist_is_noticed(
    accepted: dict[Section, set[str]],
) -> None:
    doc = CONFIG_DOC.read_text().replace(
        "| `mtu` |", "| `mtu_bytes` | integer | 1420 | gone |\n| `mtu` |", 1
    )
    assert "[interface] mtu_bytes: documented, not accepted" in config_doc_problems(accepted, doc)


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        (r"^\| `tunneld reload", "tunneld reload: no row in the README's CLI reference"),
        (r"^\| `--log-format", "--log-format: not in the README's CLI reference"),
        (r"^\| `tunneld install-systemd", "tunneld install-systemd: no row in the README's CLI "),
    ],
)
def test_a_missing_command_or_option_is_noticed(pattern: str, problem: str) -> None:
    problems = cli_doc_problems(_parser(), without_line(README.read_text(), pattern))
    assert [found for found in problems if found.startswith(problem)]


def test_a_missing_sub_command_option_is_noticed() -> None:
    readme = README.read_text().replace("[--json]", "", 1)
    assert "tunneld status --json: not in its row" in cli_doc_problems(_parser(), readme)


def test_a_missing_metric_is_noticed() -> None:
    readme = without_line(README.read_text(), r"^\| `tunneld_config_info`")
    assert metrics_doc_problems(metric_names(), readme) == [
        "tunneld_config_info: not in the README"
    ]
