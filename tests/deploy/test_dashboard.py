"""The Grafana dashboard deploy/grafana/egress-sidecar.json: importable, and every query valid.

PromQL validity is checked with the real promtool: each panel query, with the dashboard's template
variables replaced by sample values, becomes a recording rule in a temporary rules file that
`promtool check rules` must accept.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.promtool_util import CONTRACT_METRICS, metric_names, run_promtool

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "egress-sidecar.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Sample values for template variables, as Grafana would interpolate them.
VARIABLES = {
    "job": "egress-sidecar",
    "window": "10m",
    "__rate_interval": "2m",
    "__interval": "1m",
    "__range": "6h",
}
_VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def queries(dashboard: dict) -> list[tuple[dict, dict]]:
    """(panel, target) for every PromQL target."""
    return [(p, t) for p in all_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def interpolate(expr: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"unknown template variable ${name} in {expr!r}"
        return VARIABLES[name]
    return _VAR_RE.sub(value, expr)


def promtool_rejects(exprs: dict[str, str], tmp_path: Path) -> str:
    """Write exprs as recording rules and run `promtool check rules`; return its output on failure."""
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": name, "expr": expr} for name, expr in exprs.items()]}]}
    path = tmp_path / "dashboard-queries.rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    proc = run_promtool("check", "rules", path)
    if proc.returncode == 0 and f"SUCCESS: {len(exprs)} rules found" in proc.stdout:
        return ""
    return proc.stdout + proc.stderr


def find_panels(dashboard: dict, predicate) -> list[dict]:
    return [p for p in all_panels(dashboard) if predicate(p, " ".join(t.get("expr", "") for t in p.get("targets", [])))]


# --- structure -------------------------------------------------------------------------------------

def test_dashboard_is_importable_json():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "egress-sidecar"
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["id"] is None, "an exported id would clash on import"
    assert dashboard["panels"]


def test_datasource_and_job_variables():
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    job = variables["job"]
    assert job["type"] == "query"
    assert job["datasource"] == DATASOURCE
    assert metric_names(job["definition"]) <= CONTRACT_METRICS
    assert metric_names(job["query"]["query"]) == metric_names(job["definition"]) != set()


def test_every_panel_has_a_title_and_the_datasource_variable():
    for panel in all_panels(load_dashboard()):
        assert panel.get("title", "").strip(), f"panel {panel.get('id')} has no title"
        assert panel.get("datasource") == DATASOURCE, f"{panel['title']}: datasource {panel.get('datasource')}"
        for target in panel.get("targets", []):
            assert target.get("datasource") == DATASOURCE, f"{panel['title']} {target['refId']}"


def test_panel_ids_unique_and_layout_does_not_overlap():
    cells: dict[tuple[int, int], str] = {}
    panels = all_panels(load_dashboard())
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_the_required_panels_are_there():
    d = load_dashboard()
    required = {
        "success ratio by egress IP": lambda p, e: 'outcome="success"' in e and "by (egress_ip)" in e and "/" in e,
        "ip_restricted by egress IP": lambda p, e: 'outcome="ip_restricted"' in e and "by (egress_ip)" in e,
        "outcomes stacked": lambda p, e: "by (outcome)" in e
        and p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal",
        "allowlist coverage stat": lambda p, e: p["type"] == "stat" and "egress_sidecar_allowlist_coverage_ratio" in e,
        "member up/down": lambda p, e: p["type"] in ("state-timeline", "stat")
        and "egress_sidecar_pair_member_up" in e and "member" in e and "egress_ip" in e,
        "egress IP allowlisted table": lambda p, e: p["type"] == "table" and "egress_sidecar_egress_ip_allowlisted" in e,
        "latency quantiles": lambda p, e: all(f"histogram_quantile({q}," in e for q in ("0.5", "0.9", "0.99")),
        "blocked calls": lambda p, e: 'outcome="blocked"' in e,
        "egress IP changes": lambda p, e: "egress_sidecar_egress_ip_changes_total" in e,
        "refresh token reuse": lambda p, e: "egress_sidecar_refresh_token_reuse_total" in e,
        "idle grants": lambda p, e: 'egress_sidecar_grants_idle' in e,
        "what Salesforce refused": lambda p, e: "egress_sidecar_egress_ip_refused" in e
        and "egress_sidecar_allowlist_disagreement" in e,
        "client TLS failures": lambda p, e: "egress_sidecar_client_tls_failures_total" in e and "by (reason)" in e,
        "connections open and refused": lambda p, e: "egress_sidecar_client_connections" in e
        and "egress_sidecar_connections_refused_total" in e,
        "Redis up/down per pod": lambda p, e: p["type"] == "state-timeline" and "egress_sidecar_redis_up" in e
        and "by (instance)" in e,
    }
    missing = [name for name, predicate in required.items() if not find_panels(d, predicate)]
    assert not missing, f"no panel for: {missing}"


def test_text_panel_explains_the_partial_allowlist():
    texts = [p["options"]["content"] for p in all_panels(load_dashboard()) if p["type"] == "text"]
    assert texts
    text = " ".join(texts)
    for phrase in ("ip_restricted", "success", "Refresh Token IP Allowlist", "External Client App Manager", "Edit Settings"):
        assert phrase in text, phrase


# --- queries ---------------------------------------------------------------------------------------

def test_queries_reference_only_contract_metrics():
    pairs = queries(load_dashboard())
    assert len(pairs) >= 15
    for panel, target in pairs:
        names = metric_names(target["expr"])
        assert names, f"{panel['title']} {target['refId']}: no egress_sidecar_* metric"
        assert names <= CONTRACT_METRICS, f"{panel['title']}: unknown {sorted(names - CONTRACT_METRICS)}"


def test_queries_use_only_defined_variables():
    defined = {v["name"] for v in load_dashboard()["templating"]["list"]} | {"__rate_interval", "__interval", "__range"}
    for panel, target in queries(load_dashboard()):
        used = {a or b for a, b in _VAR_RE.findall(target["expr"])}
        assert used <= defined, f"{panel['title']}: undefined {sorted(used - defined)}"
        assert "$job" in target["expr"], f"{panel['title']} {target['refId']}: ignores the job selector"


def test_every_query_is_valid_promql(tmp_path):
    exprs = {f"dashboard_panel_{p['id']}_{t['refId']}": interpolate(t["expr"]) for p, t in queries(load_dashboard())}
    assert promtool_rejects(exprs, tmp_path) == ""


def test_validity_check_rejects_invalid_promql(tmp_path):
    # The check above is not vacuous: promtool rejects a broken query written the same way.
    output = promtool_rejects({"ok": "sum(egress_sidecar_failovers_total)",
                               "broken": 'sum by (egress_ip (rate(egress_sidecar_tunnels_total[5m]))'}, tmp_path)
    assert "broken" in output or "parse" in output.lower(), output


def test_success_ratio_panel_shows_the_partial_allowlist(tmp_path):
    # Evaluate the panel's query with promtool on the classic series: one IP at 0, the other at 1.
    (panel,) = find_panels(load_dashboard(), lambda p, e: p["type"] == "timeseries" and 'outcome="success"' in e
                           and "by (egress_ip)" in e and "/" in e)
    expr = interpolate(panel["targets"][0]["expr"])
    base = 'egress_sidecar_token_requests_total{job="egress-sidecar",instance="10.0.0.1:9464",grant_type="refresh_token",'
    test = {
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": base + 'member="192.0.2.1:9293",egress_ip="203.0.113.10",outcome="ip_restricted"}',
                 "values": "0+1x30"},
                {"series": base + 'member="192.0.2.2:9293",egress_ip="203.0.113.20",outcome="success"}',
                 "values": "0+1x30"},
                {"series": base + 'member="none",egress_ip="none",outcome="blocked"}', "values": "0+1x30"},
            ],
            "promql_expr_test": [{
                "expr": expr,
                "eval_time": "20m",
                "exp_samples": [
                    {"labels": '{egress_ip="203.0.113.10"}', "value": 0},
                    {"labels": '{egress_ip="203.0.113.20"}', "value": 1},
                ],
            }],
        }],
    }
    path = tmp_path / "panel.test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False), encoding="utf-8")
    proc = run_promtool("test", "rules", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("expr", ["rate(x[$window])", "rate(x[${window}])", "rate(x[$__rate_interval])"])
def test_interpolate_replaces_variables(expr):
    assert "$" not in interpolate(expr)


def promtool_evaluates(tmp_path: Path, expr: str, series: list[dict], eval_time: str,
                       expected: list[dict]) -> str:
    """Evaluate ``expr`` with promtool over ``series`` (1m steps); "" when it gives ``expected``."""
    test = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "promql_expr_test": [{"expr": expr, "eval_time": eval_time, "exp_samples": expected}]}]}
    path = tmp_path / "panel.test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False), encoding="utf-8")
    proc = run_promtool("test", "rules", path)
    return "" if proc.returncode == 0 else proc.stdout + proc.stderr


def coverage_panel() -> dict:
    (panel,) = find_panels(load_dashboard(), lambda p, e: p["type"] == "stat"
                           and "egress_sidecar_allowlist_coverage_ratio" in e)
    return panel


_JOB = 'job="egress-sidecar",instance="10.0.0.1:9464"'
_IP1, _IP2 = "203.0.113.10", "203.0.113.20"


def _gauge(name: str, value: str, ip: str | None = None) -> dict:
    labels = _JOB + (f',egress_ip="{ip}"' if ip else "")
    return {"series": f"{name}{{{labels}}}", "values": value}


@pytest.mark.parametrize(("case", "series", "expected"), [
    # The classic slip: both IPs typed into SIDECAR_ALLOWLIST, Salesforce refuses one. Not 100 %.
    ("allowlist lists both, Salesforce refuses one", [
        _gauge("egress_sidecar_allowlist_coverage_ratio", "1x10"),
        _gauge("egress_sidecar_egress_ip_allowlisted", "1x10", _IP1),
        _gauge("egress_sidecar_egress_ip_allowlisted", "1x10", _IP2),
        _gauge("egress_sidecar_egress_ip_refused", "0x10", _IP1),
        _gauge("egress_sidecar_egress_ip_refused", "1x10", _IP2),
        _gauge("egress_sidecar_allowlist_disagreement", "0x10", _IP1),
        _gauge("egress_sidecar_allowlist_disagreement", "1x10", _IP2),
    ], 0.5),
    ("allowlist lists both, Salesforce accepts both", [
        _gauge("egress_sidecar_allowlist_coverage_ratio", "1x10"),
        _gauge("egress_sidecar_egress_ip_allowlisted", "1x10", _IP1),
        _gauge("egress_sidecar_egress_ip_allowlisted", "1x10", _IP2),
        _gauge("egress_sidecar_egress_ip_refused", "0x10", _IP1),
        _gauge("egress_sidecar_egress_ip_refused", "0x10", _IP2),
    ], 1),
    # Listed one IP; Salesforce accepted the unlisted other: refreshes may leave from both.
    ("one listed, the unlisted one accepted by Salesforce", [
        _gauge("egress_sidecar_allowlist_coverage_ratio", "0.5x10"),
        _gauge("egress_sidecar_egress_ip_allowlisted", "1x10", _IP1),
        _gauge("egress_sidecar_egress_ip_allowlisted", "0x10", _IP2),
        _gauge("egress_sidecar_allowlist_disagreement", "1x10", _IP2),
    ], 1),
    ("one listed, nothing heard from Salesforce", [
        _gauge("egress_sidecar_allowlist_coverage_ratio", "0.5x10"),
        _gauge("egress_sidecar_egress_ip_allowlisted", "1x10", _IP1),
        _gauge("egress_sidecar_egress_ip_allowlisted", "0x10", _IP2),
    ], 0.5),
])
def test_coverage_panel_follows_salesforce(tmp_path, case, series, expected):
    expr = interpolate(coverage_panel()["targets"][0]["expr"])
    assert promtool_evaluates(tmp_path, expr, series, "5m", [{"labels": "{}", "value": expected}]) == "", case


def test_coverage_panel_says_when_no_allowlist_is_typed(tmp_path):
    """Without SIDECAR_ALLOWLIST the sidecar exports the ratio as NaN (there is nothing to cover) and no
    per-IP allowlisted series: the panel shows words, not a red 0 %."""
    panel = coverage_panel()
    expr = interpolate(panel["targets"][0]["expr"])
    series = [_gauge("egress_sidecar_allowlist_coverage_ratio", " ".join(["NaN"] * 10)),
              _gauge("egress_sidecar_egress_ip_refused", "0x10", _IP1)]
    # NaN is the one value that is not equal to itself.
    assert promtool_evaluates(tmp_path, f"count(({expr}) != ({expr}))", series, "5m",
                              [{"labels": "{}", "value": 1}]) == ""
    texts = [m["options"]["result"]["text"] for m in panel["fieldConfig"]["defaults"]["mappings"]
             if m["type"] == "special" and m["options"]["match"] == "nan"]
    assert texts == ["no allowlist typed"]
    assert "no egress IP" in panel["fieldConfig"]["defaults"]["noValue"]


def retries_target() -> dict:
    (panel,) = find_panels(load_dashboard(), lambda p, e: "egress_sidecar_ip_restricted_retries_total" in e)
    (target,) = [t for t in panel["targets"] if "egress_sidecar_ip_restricted_retries_total" in t["expr"]]
    return target


@pytest.mark.parametrize("values", ["_x3 0 1x6", "_x3 1x6"], ids=["born at 0", "born at 1"])
def test_retries_panel_counts_the_first_retry(tmp_path, values):
    """A sidecar's first retry must show: its series is created at 0 at start (and an older sidecar's was
    born at 1, with its first retry), and increase() alone sees no step in a series' first sample."""
    expr = interpolate(retries_target()["expr"])
    series = [{"series": f'egress_sidecar_ip_restricted_retries_total{{{_JOB},outcome="success"}}', "values": values}]
    assert promtool_evaluates(tmp_path, expr, series, "8m", [{"labels": '{outcome="success"}', "value": 1}]) == ""


def test_retries_panel_still_sees_increases_of_an_old_series(tmp_path):
    expr = interpolate(retries_target()["expr"])
    series = [{"series": f'egress_sidecar_ip_restricted_retries_total{{{_JOB},outcome="success"}}',
               "values": "5x20 6 7 8 9 10x10"}]
    # 10 minutes after the series' birth 20 minutes ago: five retries in the window ($window = 10m).
    assert promtool_evaluates(tmp_path, expr, series, "30m", [{"labels": '{outcome="success"}', "value": 5}]) == ""
