"""The README and --help stay true to the code: every setting, metric and command is documented."""

from __future__ import annotations

import argparse
import subprocess
import sys

from sidecar.cli import ENV_HELP, build_parser
from sidecar.config import (
    README_TABLE_END,
    README_TABLE_START,
    Settings,
    env_name,
    readme_with_settings_table,
    setting_docs,
)
from sidecar.metrics import Metrics
from tests.harness import ROOT

README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    for field in Settings.model_fields:
        name = env_name(field)
        assert f"`{name}`" in README or f"`{name}`," in README, f"{name} missing from README"
        assert name in ENV_HELP, f"{name} missing from --help"


def test_every_metric_is_documented() -> None:
    names = {m.name for m in Metrics().registry.collect()}
    assert len(names) > 10
    for name in names:
        full = name + "_total" if f"{name}_total" in README else name
        assert f"`{full}`" in README, f"metric {full} missing from README"


def test_every_command_is_documented_and_has_help() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"run", "check", "demo", "exec", "grants"}
    for command in sub.choices:
        assert f"egress-sidecar {command}" in README, command
        out = subprocess.run([sys.executable, "-m", "sidecar", command, "--help"], capture_output=True, text=True,
                             timeout=30, cwd=ROOT)
        assert out.returncode == 0 and f"usage: egress-sidecar {command}" in out.stdout


def test_quickstart_has_the_two_commands() -> None:
    quick = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    assert "make demo" in quick and "make test" in quick
    makefile = (ROOT / "Makefile").read_text()
    assert "egress-sidecar demo" in makefile and "-m pytest" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# ------------------------------------------------------- settings: one help text per setting


def readme_settings_rows(readme: str) -> dict[str, tuple[str, str]]:
    """The README's configuration table: variable -> (default, meaning), as written."""
    start, end = readme.index(README_TABLE_START), readme.index(README_TABLE_END)
    rows = {}
    for line in readme[start:end].splitlines()[3:]:  # the marker, the header, the rule
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3 and cells[0].startswith("`"), f"not a table row: {line!r}"
        rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def table_disagreements(readme: str) -> list[str]:
    want = {d.name: (d.default, d.meaning) for d in setting_docs()}
    have = readme_settings_rows(readme)
    problems = [f"{n} is not a setting" for n in have.keys() - want.keys()]
    problems += [f"{n} is missing" for n in want.keys() - have.keys()]
    problems += [f"{n}: README says {have[n]}, sidecar/config.py says {want[n]}"
                 for n in want.keys() & have.keys() if have[n] != want[n]]
    return problems


def test_readme_settings_table_matches_the_fields() -> None:
    """Name, default and meaning of every setting come from its Field (run `make docs` after a change)."""
    problems = table_disagreements(README)
    assert not problems, "README configuration table is out of date (run `make docs`):\n" + "\n".join(problems)
    assert list(readme_settings_rows(README)) == [d.name for d in setting_docs()], "run `make docs`"
    assert readme_with_settings_table(README) == README, "run `make docs`"


def test_table_check_catches_a_wrong_default_a_missing_and_an_unknown_setting() -> None:
    assert table_disagreements(README.replace("| `SIDECAR_LISTEN` | `127.0.0.1:3128` |", "| `SIDECAR_LISTEN` | `:3128` |"))
    row = next(line for line in README.splitlines() if line.startswith("| `SIDECAR_ROUTE` |"))
    assert table_disagreements(README.replace(row + "\n", "")) == ["SIDECAR_ROUTE is missing"]
    assert table_disagreements(README.replace(row, row + "\n| `SIDECAR_ROUT` | `token` | typo |")) == [
        "SIDECAR_ROUT is not a setting"
    ]
    stale = README.replace("| `SIDECAR_LISTEN` | `127.0.0.1:3128` |", "| `SIDECAR_LISTEN` | `:3128` |")
    assert readme_with_settings_table(stale) == README


def test_run_help_lists_every_setting_with_its_default_and_meaning() -> None:
    out = subprocess.run([sys.executable, "-m", "sidecar", "run", "--help"], capture_output=True, text=True,
                         timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    flat = " ".join(out.stdout.split())
    for d in setting_docs():
        assert f"{d.name} (default: {d.default.replace('`', '')})" in flat, f"{d.name} missing from run --help"
        assert " ".join(d.meaning.replace("`", "").split()) in flat, f"{d.name}'s meaning missing from run --help"


def test_every_setting_has_a_description() -> None:
    for field, info in Settings.model_fields.items():
        assert info.description and info.description.endswith("."), f"Settings.{field}: describe it (one place)"
