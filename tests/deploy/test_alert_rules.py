"""The Prometheus alert rules, checked and unit-tested with the real promtool.

deploy/prometheus/egress-sidecar.rules.yml is the source; deploy/kubernetes/prometheusrule.yaml is
generated from it. The promtool unit tests live in tests/deploy/promtool/*.test.yml: for every alert one
series where it must fire (labels and annotations checked) and one where it must stay silent.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from tests.deploy.promtool_util import (
    CONTRACT_LABELS,
    CONTRACT_METRICS,
    PromtoolError,
    metric_names,
    promtool_check_metrics,
    run_promtool,
)

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "egress-sidecar.rules.yml"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "scrape-config.yml"
RESOURCE = ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml"
RENDER_SCRIPT = ROOT / "deploy" / "prometheus" / "render_prometheusrule.py"
UNIT_TESTS = sorted((ROOT / "tests" / "deploy" / "promtool").glob("*.test.yml"))

EXPECTED_ALERTS = {
    "SalesforcePartialAllowlist",
    "SalesforceEgressNotAllowlisted",
    "QuotaGuardMemberDown",
    "QuotaGuardEgressIPChanged",
    "SalesforceTokenCallsBlocked",
    "SalesforceTokenFailureRateHigh",
    "SalesforceRefreshTokenIdle",
    "SalesforceRefreshTokenReuse",
    "EgressSidecarAuditWritesDropped",
    "EgressSidecarClientTLSFailing",
    "SalesforceEgressIPRefused",
    "SalesforceOrgRestrictsEgressIP",
    "SalesforceAllowlistDisagreement",
    "QuotaGuardEgressProbesFailing",
    "EgressSidecarConnectionsRefused",
    "EgressUnverified",
    "RedisUnreachable",
}
SEVERITIES = {"page", "warning", "ticket"}
ANNOTATIONS = {"summary", "description", "runbook"}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules(doc: dict) -> dict[str, dict]:
    return {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule}


def duration_s(text: str) -> int:
    """A Prometheus duration such as '3m' or '1h30m' in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert parts and text, f"not a duration: {text!r}"
    h, m, s = (int(p or 0) for p in parts.groups())
    return h * 3600 + m * 60 + s


# --- the rules file ----------------------------------------------------------------------------

def test_rules_file_passes_promtool_check():
    proc = run_promtool("check", "rules", RULES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules(load_yaml(RULES)))} rules found" in proc.stdout


def test_scrape_config_passes_promtool_check_config():
    # Also loads the rules file it names, so the example config and the rules stay usable together.
    proc = run_promtool("check", "config", SCRAPE_CONFIG)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout


def test_scrape_config_targets_admin_port_metrics_path():
    (job,) = load_yaml(SCRAPE_CONFIG)["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["scrape_interval"] == "30s"  # the rules' timing assumes it
    assert all(t.endswith(":9464") for c in job["static_configs"] for t in c["targets"])


def test_one_group_with_the_expected_alerts():
    doc = load_yaml(RULES)
    assert [g["name"] for g in doc["groups"]] == ["egress-sidecar"]
    assert set(alert_rules(doc)) == EXPECTED_ALERTS


@pytest.mark.parametrize("alert", sorted(EXPECTED_ALERTS))
def test_alert_has_severity_and_operator_annotations(alert):
    rule = alert_rules(load_yaml(RULES))[alert]
    assert rule["labels"]["severity"] in SEVERITIES
    assert set(rule["annotations"]) == ANNOTATIONS
    for name in ANNOTATIONS:
        assert len(rule["annotations"][name].split()) >= 5, f"{alert}: {name} too short to act on"
    assert "for" in rule, f"{alert}: state `for:` explicitly, even 0m"
    duration_s(rule["for"])


def test_allowlist_alerts_tell_where_to_add_the_ip():
    rules = alert_rules(load_yaml(RULES))
    for alert in ("SalesforcePartialAllowlist", "SalesforceEgressNotAllowlisted"):
        description = rules[alert]["annotations"]["description"]
        assert "{{ $labels.egress_ip }}" in description
        assert "External Client App Manager → Edit Settings" in description
        assert "Refresh Token IP Allowlist" in description


def test_partial_allowlist_is_fast_enough_and_never_pages_on_one_call():
    rule = alert_rules(load_yaml(RULES))["SalesforcePartialAllowlist"]
    assert rule["labels"]["severity"] == "page"
    windows = {duration_s(w) for w in re.findall(r"\[(\w+)\]", rule["expr"])}
    # failure window + `for` + scrape (30s) + evaluation (1m) delays must fit in ten minutes of
    # steady traffic; the unit test "caught within 10 minutes" checks the same thing on series.
    assert duration_s(rule["for"]) + 90 < 600
    assert min(windows) <= 600
    assert re.search(r"\)\s*>=\s*2\s*\)", rule["expr"]), "threshold must stay above one call"


def test_rule_expressions_reference_only_contract_metrics():
    used: set[str] = set()
    for name, rule in alert_rules(load_yaml(RULES)).items():
        names = metric_names(rule["expr"])
        assert names, f"{name}: no egress_sidecar_* metric in {rule['expr']!r}"
        assert names <= CONTRACT_METRICS, f"{name}: unknown metrics {sorted(names - CONTRACT_METRICS)}"
        used |= names
    assert "egress_sidecar_token_requests_total" in used


_AGGREGATION = re.compile(r"\b(sum|max|min|count|avg|group|stddev|stdvar|topk|bottomk|quantile)\s*"
                         r"(?:(by|without)\s*\(([^)]*)\))?\s*\(")
_BINARY_MATCH = re.compile(r"\b(on|ignoring)\s*\(([^)]*)\)")


def test_every_rule_keeps_the_job_apart():
    """One job is one app (one allowlist; deploy/kubernetes/podmonitor.yaml and scrape-config.yml give each
    app its own): every aggregation keeps `job` and every vector match joins on it, so two apps are never
    summed or compared with each other, and one app's replicas always are (never `by (instance)`)."""
    for name, rule in alert_rules(load_yaml(RULES)).items():
        expr = rule["expr"]
        aggregations = _AGGREGATION.findall(expr)
        assert aggregations, f"{name}: no aggregation: one alert per pod instead of one per job"
        for op, kind, labels in aggregations:
            names = {x.strip() for x in labels.split(",")}
            assert kind == "by" and "job" in names, f"{name}: {op} {kind} ({labels}) drops the job"
            assert "instance" not in names, f"{name}: {op} by ({labels}) alerts per pod"
        for kind, labels in _BINARY_MATCH.findall(expr):
            assert kind == "on" and "job" in {x.strip() for x in labels.split(",")}, f"{name}: {kind} ({labels})"


def test_job_check_catches_an_aggregation_without_job():
    rule = {"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "sum by (egress_ip) (egress_sidecar_failovers_total) > 0"}]}]}
    assert not all("job" in labels for _, _, labels in _AGGREGATION.findall(rule["groups"][0]["rules"][0]["expr"]))


def test_metric_names_strips_histogram_suffixes_and_ignores_recording_rules():
    expr = (
        'histogram_quantile(0.9, sum by (le) (rate(egress_sidecar_token_request_duration_seconds_bucket[5m])))'
        ' / job:egress_sidecar_token_requests:rate5m + egress_sidecar_bogus_total'
    )
    assert metric_names(expr) == {"egress_sidecar_token_request_duration_seconds", "egress_sidecar_bogus_total"}


# --- the PrometheusRule ------------------------------------------------------------------------

def test_prometheusrule_holds_the_same_groups_as_the_rules_file():
    resource = load_yaml(RESOURCE)
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["metadata"]["name"] == "egress-sidecar"
    assert resource["spec"]["groups"] == load_yaml(RULES)["groups"]


def test_prometheusrule_is_up_to_date_with_its_generator():
    spec = importlib.util.spec_from_file_location("render_prometheusrule", RENDER_SCRIPT)
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert render.render(RULES.read_text(encoding="utf-8")) == RESOURCE.read_text(encoding="utf-8"), (
        f"run python {RENDER_SCRIPT.relative_to(ROOT)}"
    )


# --- promtool unit tests -----------------------------------------------------------------------

def test_promtool_unit_tests_pass():
    assert UNIT_TESTS, "no tests/deploy/promtool/*.test.yml"
    proc = run_promtool("test", "rules", *UNIT_TESTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(UNIT_TESTS), proc.stdout


def _alert_cases() -> list[tuple[str, str, list]]:
    """(test case name, alertname, exp_alerts) for every alert_rule_test in every fixture."""
    cases = []
    for path in UNIT_TESTS:
        for test in load_yaml(path)["tests"]:
            for check in test.get("alert_rule_test", []):
                cases.append((f"{path.name}: {test['name']}", check["alertname"], check.get("exp_alerts") or []))
    return cases


@pytest.mark.parametrize("alert", sorted(EXPECTED_ALERTS))
def test_every_alert_has_a_firing_and_a_silent_unit_test(alert):
    cases = [c for c in _alert_cases() if c[1] == alert]
    firing = [c for c in cases if c[2]]
    silent = [c for c in cases if not c[2]]
    assert firing, f"no unit test where {alert} fires"
    assert silent, f"no unit test where {alert} stays silent"
    severity = alert_rules(load_yaml(RULES))[alert]["labels"]["severity"]
    for name, _, exp_alerts in firing:
        for exp in exp_alerts:
            assert exp["exp_labels"]["severity"] == severity, name
            assert set(exp["exp_annotations"]) == ANNOTATIONS, name


def test_unit_test_fixtures_use_the_rules_file_and_contract_metrics():
    for path in UNIT_TESTS:
        doc = load_yaml(path)
        assert [(path.parent / f).resolve() for f in doc["rule_files"]] == [RULES], path.name
        for test in doc["tests"]:
            for series in test["input_series"]:
                # A typo in a series name would make a "stays silent" case pass for nothing.
                name = series["series"].split("{", 1)[0]
                assert name in CONTRACT_METRICS, f"{path.name}: {test['name']}: unknown series {name}"


def _run_unit_tests_against(rules_doc: dict, tmp_path: Path) -> str:
    """Run all fixtures against a modified copy of the rules; return promtool's output if it failed."""
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(rules_doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    copies = []
    for path in UNIT_TESTS:
        doc = load_yaml(path)
        doc["rule_files"] = [str(rules)]
        copy = tmp_path / path.name
        copy.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
        copies.append(copy)
    proc = run_promtool("test", "rules", *copies)
    return "" if proc.returncode == 0 else proc.stdout + proc.stderr


def test_unit_tests_pass_on_an_unmodified_copy(tmp_path):
    # The harness of the mutation tests below is sound: no change, no failure.
    assert _run_unit_tests_against(load_yaml(RULES), tmp_path) == ""


# Each mutation breaks one rule the way a careless edit would; the unit tests must notice, in the
# named test case.
MUTATIONS = [
    ("SalesforcePartialAllowlist", "expr", ") >= 2\n)\nand on (job)", ") >= 1\n)\nand on (job)",
     "one ip_restricted call does not fire"),
    ("SalesforcePartialAllowlist", "expr", "  unless on (job, egress_ip)", "  or on (job, egress_ip)",
     "failures and successes through the same single IP are not a partial allowlist"),
    ("SalesforcePartialAllowlist", "for", "3m", "5m", "caught within 10 minutes"),
    ("SalesforceTokenFailureRateHigh", "expr", ">= 10", ">= 1", "a few failures at low volume do not fire"),
    ("SalesforceTokenFailureRateHigh", "expr", 'outcome!~"success|blocked"', 'outcome!="success"',
     "blocked calls do not count as failures"),
    ("QuotaGuardMemberDown", "expr", "max by", "min by", "one pod's view does not fire"),
    ("SalesforceTokenCallsBlocked", "expr", ">= 2", "> 0", "one blocked call does not fire"),
    ("SalesforceRefreshTokenIdle", "expr", 'state="expiring"', 'state=~".+"', "not close to their org's expiry"),
    ("SalesforceRefreshTokenIdle", "expr", 'egress_sidecar_grants_expiry{state="expiring"}',
     'egress_sidecar_grants_idle{window="25d"}', "not close to their org's expiry"),
    ("EgressSidecarAuditWritesDropped", "expr", ") > 0", ") > 100", "dropped audit records warn at once"),
    ("EgressSidecarConnectionsRefused", "expr", 'reason="max_connections"', 'reason=~".+"',
     "refused remote clients do not warn"),
    ("EgressUnverified", "expr", "max by", "min by", "one pod that still verifies keeps it silent"),
    ("RedisUnreachable", "for", "1m", "0m", "a restart of a few seconds does not warn"),
]


@pytest.mark.parametrize(("alert", "field", "old", "new", "caught_by"), MUTATIONS,
                         ids=[f"{m[0]}:{m[4]}" for m in MUTATIONS])
def test_unit_tests_catch_a_broken_rule(tmp_path, alert, field, old, new, caught_by):
    doc = load_yaml(RULES)
    rule = alert_rules(doc)[alert]
    assert old in rule[field], f"mutation does not apply: {old!r} not in {alert}.{field}"
    rule[field] = rule[field].replace(old, new)
    output = _run_unit_tests_against(doc, tmp_path)
    assert output, f"promtool unit tests still pass with {alert}.{field}: {old!r} -> {new!r}"
    assert caught_by in output


# --- promtool check metrics helper -------------------------------------------------------------

def _sample_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    requests = Counter(
        "egress_sidecar_token_requests_total", "Salesforce token calls.",
        ("grant_type", "member", "egress_ip", "outcome"), registry=registry,
    )
    duration = Histogram(
        "egress_sidecar_token_request_duration_seconds", "Token call duration.",
        ("member", "egress_ip"), registry=registry,
    )
    up = Gauge("egress_sidecar_pair_member_up", "Member answered its last probe.", ("member", "egress_ip"),
               registry=registry)
    requests.labels("refresh_token", "192.0.2.1:9293", "203.0.113.10", "ip_restricted").inc()
    requests.labels("refresh_token", "192.0.2.2:9293", "203.0.113.20", "success").inc(3)
    duration.labels("192.0.2.2:9293", "203.0.113.20").observe(0.21)
    up.labels("192.0.2.1:9293", "203.0.113.10").set(1)
    return registry


def test_promtool_check_metrics_accepts_prometheus_client_output():
    text = generate_latest(_sample_registry()).decode()
    assert 'egress_sidecar_token_request_duration_seconds_bucket{' in text
    assert promtool_check_metrics(text) == []


def test_promtool_check_metrics_reports_lint_problems():
    text = "# TYPE egress_sidecar_failovers counter\negress_sidecar_failovers 1\n"
    problems = promtool_check_metrics(text)
    assert any('should have "_total" suffix' in p for p in problems), problems
    assert any("no help text" in p for p in problems), problems


def test_promtool_check_metrics_raises_on_unparsable_text():
    with pytest.raises(PromtoolError, match="parsing error"):
        promtool_check_metrics('egress_sidecar_failovers_total{member="a" 1\n')


def test_sidecar_exports_the_contract_and_lints_clean():
    # The rules and the dashboard are written against CONTRACT_METRICS/CONTRACT_LABELS; the sidecar's
    # one metrics module must export them (it may export more), in an exposition promtool accepts.
    from sidecar.metrics import Metrics

    metrics = Metrics()
    metrics.redis_up.set(1)  # registered by a sidecar with SIDECAR_REDIS_URL only
    registry = metrics.registry
    text = generate_latest(registry).decode()
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    assert CONTRACT_METRICS <= exported, f"not exported: {sorted(CONTRACT_METRICS - exported)}"
    collectors = registry._names_to_collectors  # no public API lists a labelled metric's label names
    for name, labels in CONTRACT_LABELS.items():
        assert set(collectors[name]._labelnames) == set(labels), name
    assert promtool_check_metrics(text) == []
