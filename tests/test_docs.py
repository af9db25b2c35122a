"""The README and --help stay true to the code: every setting, metric and command is documented."""

from __future__ import annotations

import argparse
import subprocess
import sys

from sidecar.cli import ENV_HELP, build_parser
from sidecar.config import Settings, env_name
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
