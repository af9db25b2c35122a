"""The README, docs/ and --help stay true to the code: every setting, metric, alert, endpoint, command and
app variable is documented on its page, every link resolves, every page is reachable from the README."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import yaml

from sidecar.app.cli import ENV_HELP, build_parser
from sidecar.config import (
    SETTINGS_PAGE,
    SETTINGS_TABLE_END,
    SETTINGS_TABLE_START,
    Settings,
    env_name,
    setting_docs,
    with_settings_table,
)
from sidecar.metrics import Metrics
from sidecar.ops.admin import ENDPOINTS
from sidecar.ops.trust import client_env
from tests.harness import ROOT

README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
CONFIGURATION = (ROOT / SETTINGS_PAGE).read_text()
OBSERVABILITY = DOCS["observability.md"]
RUNNING = DOCS["running.md"]
RULES = ROOT / "deploy" / "prometheus" / "egress-sidecar.rules.yml"
DEPLOYMENT = ROOT / "deploy" / "kubernetes" / "deployment.yaml"
README_MAX_LINES = 150  # read in five minutes; the rest lives in docs/


def table_rows(page: str) -> list[list[str]]:
    """The cells of every Markdown table row of ``page`` (header and rule rows included)."""
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            for line in page.splitlines() if line.startswith("|")]


def first_cells(page: str) -> set[str]:
    """The code spans of every table row's first cell: what the page's tables document."""
    return {span for row in table_rows(page) for span in re.findall(r"`([^`]+)`", row[0])}


def section(page: str, title: str) -> str:
    return page.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


# ------------------------------------------------------- settings, commands, metrics, alerts, endpoints


def test_every_setting_is_documented_in_the_configuration_page_and_in_help() -> None:
    documented = first_cells(CONFIGURATION)
    for field in Settings.model_fields:
        name = env_name(field)
        assert name in documented, f"{name} missing from the table of {SETTINGS_PAGE}"
        assert name in ENV_HELP, f"{name} missing from --help"


def test_every_metric_is_documented_in_the_observability_page() -> None:
    metrics = Metrics()
    metrics.redis_up  # registered only with SIDECAR_REDIS_URL; documented all the same
    # prometheus-client drops a counter's `_total` from its family name; what Prometheus stores has it.
    types = {m.name + "_total" if m.type == "counter" else m.name: m.type for m in metrics.registry.collect()}
    names = set(types)
    assert {"egress_sidecar_token_requests_total", "process_resident_memory_bytes", "python_info",
            "egress_sidecar_redis_up", "egress_sidecar_token_request_duration_seconds"} <= names, names
    documented = first_cells(section(OBSERVABILITY, "Metrics"))
    missing = sorted(names - documented)
    assert not missing, f"metrics missing from the metrics tables of docs/observability.md: {missing}"
    unknown = sorted(n for n in documented - names if re.fullmatch(r"[a-z_]+", n))
    assert not unknown, f"docs/observability.md documents metrics the sidecar does not export: {unknown}"
    for row in table_rows(section(OBSERVABILITY, "Metrics")):
        name = row[0].strip("`")
        assert name not in types or row[1] == types[name], f"{name} is a {types[name]}, the docs say {row[1]}"


def test_every_alert_rule_is_documented_in_the_observability_page() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert len(alerts) >= 10
    rows = {row[0].strip("`"): row for row in table_rows(OBSERVABILITY) if row[0].strip("`") in alerts}
    assert set(rows) == alerts, f"alerts missing from docs/observability.md: {sorted(alerts - set(rows))}"
    severity = {r["alert"]: r["labels"]["severity"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    for alert, row in rows.items():
        assert row[1] == severity[alert], f"{alert}: the docs say severity {row[1]}, the rules {severity[alert]}"


def test_every_admin_endpoint_is_documented_in_the_observability_page() -> None:
    documented = first_cells(section(OBSERVABILITY, "Admin endpoints"))
    assert set(ENDPOINTS) == documented, f"admin endpoints: code {ENDPOINTS}, docs {sorted(documented)}"


def test_every_command_is_documented_in_the_configuration_page_and_has_help() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"run", "check", "demo", "exec", "grants", "audit"}
    documented = {cell.split()[1] for cell in first_cells(section(CONFIGURATION, "Commands"))
                  if cell.startswith("egress-sidecar ")}
    assert documented == set(sub.choices), f"commands: code {sorted(sub.choices)}, docs {sorted(documented)}"
    for command in sub.choices:
        out = subprocess.run([sys.executable, "-m", "sidecar", command, "--help"], capture_output=True, text=True,
                             timeout=30, cwd=ROOT)
        assert out.returncode == 0 and f"usage: egress-sidecar {command}" in out.stdout
        for option in re.findall(r"--[a-z][a-z-]+", out.stdout.split("options:", 1)[-1]):
            if option != "--help":
                assert option in CONFIGURATION, f"egress-sidecar {command} {option} missing from {SETTINGS_PAGE}"


# ------------------------------------------------------- the README


def test_quickstart_has_the_two_commands() -> None:
    quick = section(README, "Quickstart")
    assert "make demo" in quick and "make test" in quick
    makefile = (ROOT / "Makefile").read_text()
    assert "egress-sidecar demo" in makefile and "-m pytest" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_is_short() -> None:
    lines = len(README.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move details to a page in docs/"


APP_TRUST_DIR, APP_PROXY = Path("/home/app/.egress-sidecar"), "http://127.0.0.1:3128"  # the README's example


def app_environment_problems(readme: str) -> list[str]:
    """Where the README's table of the app's environment differs from what `exec` sets (and `run` logs)
    for the table's trust directory: a variable missing or extra, a value that differs, a path that is
    not absolute. An abbreviated value (with `...`) must consist of words of the real one."""
    table: dict[str, str] = {}
    for row in table_rows(section(readme, "The app's environment"))[2:]:
        for name in re.findall(r"`([^`]+)`", row[0]):
            table[name] = row[1]
    want = client_env(APP_TRUST_DIR, APP_PROXY)
    problems = [f"{n} is missing" for n in want.keys() - table.keys()]
    problems += [f"{n} is not set by the sidecar" for n in table.keys() - want.keys()]
    for name in want.keys() & table.keys():
        value = re.fullmatch(r"`([^`]+)`", table[name])
        if value is None:
            problems.append(f"{name}: the value is not one code span: {table[name]!r}")
            continue
        shown = value.group(1)
        words = shown.split()
        if "..." in words:
            if not set(words) - {"..."} <= set(want[name].split()):
                problems.append(f"{name}: {shown!r} is not part of {want[name]!r}")
        elif shown != want[name]:
            problems.append(f"{name}: the README says {shown!r}, the sidecar sets {want[name]!r}")
        problems += [f"{name}: {path} is not absolute" for path in re.findall(r"([^\s=]*\.(?:pem|p12))\b", shown)
                     if not path.startswith("/")]
    return sorted(problems)


def test_the_readme_gives_the_app_environment_the_sidecar_sets() -> None:
    problems = app_environment_problems(README)
    assert not problems, "README.md, The app's environment:\n" + "\n".join(problems)


def test_the_app_environment_check_catches_a_missing_a_wrong_and_a_relative_value() -> None:
    row = next(line for line in README.splitlines() if line.startswith("| `CURL_CA_BUNDLE` |"))
    assert app_environment_problems(README.replace(row + "\n", "")) == ["CURL_CA_BUNDLE is missing"]
    tilde = README.replace(row, row.replace("/home/app/", "~/"))
    assert app_environment_problems(tilde) == [
        f"CURL_CA_BUNDLE: the README says '~/.egress-sidecar/ca-bundle.pem', the sidecar sets "
        f"'{APP_TRUST_DIR}/ca-bundle.pem'",
        "CURL_CA_BUNDLE: ~/.egress-sidecar/ca-bundle.pem is not absolute",
    ]
    java = next(line for line in README.splitlines() if line.startswith("| `JAVA_TOOL_OPTIONS` |"))
    wrong = README.replace(java, java.replace("-Dhttps.proxyPort=3128", "-Dhttps.proxyPort=8080"))
    assert app_environment_problems(wrong) and app_environment_problems(wrong)[0].startswith("JAVA_TOOL_OPTIONS")


def test_the_kubernetes_page_names_every_variable_the_app_container_gets() -> None:
    deployment = yaml.safe_load(DEPLOYMENT.read_text())
    app = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "app")
    given = {e["name"] for e in app["env"]}
    rows = table_rows(section(RUNNING, "Kubernetes (≥ 1.29)").split("### What the app container gets", 1)[1])
    documented = set()
    for row in rows[2:]:
        names = re.findall(r"`([A-Za-z_]+)`", row[0])
        documented |= set(names) | ({n.lower() for n in names} if "lower-case" in row[0] else set())
    assert given == documented, f"app container env: deployment {sorted(given)}, docs/running.md {sorted(documented)}"


# ------------------------------------------------------- pages and links


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: str) -> set[str]:
    without_code = re.sub(r"```.*?```", "", page, flags=re.S)
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", without_code, flags=re.M)}


def broken_links(page: str, where: Path) -> list[str]:
    """Relative links of ``page`` (a file in directory ``where``) whose file, or heading, does not exist."""
    problems = []
    without_code = re.sub(r"```.*?```", "", page, flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        file = (where / path).resolve() if path else None
        if file is not None and not file.exists():
            problems.append(f"{target}: no such file")
            continue
        if anchor and (file is None or file.suffix == ".md"):
            text = file.read_text() if file is not None else page
            if anchor not in anchors(text):
                problems.append(f"{target}: no such heading")
    return problems


def all_pages() -> dict[Path, str]:
    return {ROOT / "README.md": README, **{ROOT / "docs" / name: text for name, text in DOCS.items()}}


def test_every_relative_link_points_at_an_existing_file_and_heading() -> None:
    problems = [f"{path.relative_to(ROOT)}: {p}" for path, text in all_pages().items()
                for p in broken_links(text, path.parent)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_link_check_catches_a_missing_file_and_a_missing_heading() -> None:
    page = "# Top\n\n[ok](docs/clients.md#java) [gone](docs/nope.md) [bad](docs/clients.md#no-such) [here](#top)\n"
    assert broken_links(page, ROOT) == ["docs/nope.md: no such file", "docs/clients.md#no-such: no such heading"]
    assert github_anchor("Heroku, Render, Fly: `egress-sidecar exec`") == "heroku-render-fly-egress-sidecar-exec"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    assert {"clients.md", "architecture.md", "configuration.md", "observability.md", "running.md",
            "failure-handling.md"} <= set(DOCS)
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)(?:#[^)]*)?\)", README))
    assert set(DOCS) <= linked, f"pages not linked from README.md: {sorted(set(DOCS) - linked)}"


def test_every_docs_page_starts_with_what_it_is_for() -> None:
    for name, text in DOCS.items():
        title, blank, first, *_ = text.splitlines()
        assert title.startswith("# ") and blank == "", f"docs/{name}: start with '# Title' and a blank line"
        assert first and not first.startswith(("#", "|", "`", "-", "<")), \
            f"docs/{name}: the first line after the title says what the page is for"


# ------------------------------------------------------- settings: one help text per setting


def settings_rows(page: str) -> dict[str, tuple[str, str]]:
    """The configuration table between the markers: variable -> (default, meaning), as written."""
    start, end = page.index(SETTINGS_TABLE_START), page.index(SETTINGS_TABLE_END)
    rows = {}
    for line in page[start:end].splitlines()[3:]:  # the marker, the header, the rule
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3 and cells[0].startswith("`"), f"not a table row: {line!r}"
        rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def table_disagreements(page: str) -> list[str]:
    want = {d.name: (d.default, d.meaning) for d in setting_docs()}
    have = settings_rows(page)
    problems = [f"{n} is not a setting" for n in have.keys() - want.keys()]
    problems += [f"{n} is missing" for n in want.keys() - have.keys()]
    problems += [f"{n}: {SETTINGS_PAGE} says {have[n]}, sidecar/config.py says {want[n]}"
                 for n in want.keys() & have.keys() if have[n] != want[n]]
    return problems


def test_settings_table_matches_the_fields() -> None:
    """Name, default and meaning of every setting come from its Field (run `make docs` after a change)."""
    problems = table_disagreements(CONFIGURATION)
    assert not problems, f"{SETTINGS_PAGE}: configuration table out of date (run `make docs`):\n" + "\n".join(problems)
    assert list(settings_rows(CONFIGURATION)) == [d.name for d in setting_docs()], "run `make docs`"
    assert with_settings_table(CONFIGURATION) == CONFIGURATION, "run `make docs`"


def test_table_check_catches_a_wrong_default_a_missing_and_an_unknown_setting() -> None:
    page = CONFIGURATION
    assert table_disagreements(page.replace("| `SIDECAR_LISTEN` | `127.0.0.1:3128` |", "| `SIDECAR_LISTEN` | `:3128` |"))
    row = next(line for line in page.splitlines() if line.startswith("| `SIDECAR_ROUTE` |"))
    assert table_disagreements(page.replace(row + "\n", "")) == ["SIDECAR_ROUTE is missing"]
    assert table_disagreements(page.replace(row, row + "\n| `SIDECAR_ROUT` | `token` | typo |")) == [
        "SIDECAR_ROUT is not a setting"
    ]
    stale = page.replace("| `SIDECAR_LISTEN` | `127.0.0.1:3128` |", "| `SIDECAR_LISTEN` | `:3128` |")
    assert with_settings_table(stale) == page


def test_the_settings_table_is_only_on_its_page() -> None:
    for path, text in all_pages().items():
        if path != ROOT / SETTINGS_PAGE:
            assert SETTINGS_TABLE_START not in text, f"{path.relative_to(ROOT)} has a second settings table"


def test_run_help_lists_every_setting_with_its_default_and_meaning() -> None:
    out = subprocess.run([sys.executable, "-m", "sidecar", "run", "--help"], capture_output=True, text=True,
                         timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    flat = " ".join(out.stdout.split())
    assert SETTINGS_PAGE in flat, "--help names the page with the same table"
    for d in setting_docs():
        assert f"{d.name} (default: {d.default.replace('`', '')})" in flat, f"{d.name} missing from run --help"
        assert " ".join(d.meaning.replace("`", "").split()) in flat, f"{d.name}'s meaning missing from run --help"


def test_every_setting_has_a_description() -> None:
    for field, info in Settings.model_fields.items():
        assert info.description and info.description.endswith("."), f"Settings.{field}: describe it (one place)"
