"""The shipped alert rules against a real Prometheus server scraping the real sidecar.

The classic failure, end to end: a QuotaGuard pair (127.0.0.2, 127.0.0.3), a Salesforce whose Refresh
Token IP Allowlist holds only 127.0.0.2, the sidecar in `observe` mode with `SIDECAR_ALLOWLIST=127.0.0.2`,
and an app redeeming its refresh token every 0.2 s. A real Prometheus (Debian package `prometheus`,
/usr/bin/prometheus) scrapes the sidecar's admin port every second and evaluates a time-compressed copy
of deploy/prometheus/egress-sidecar.rules.yml. The test asks Prometheus's HTTP API, as an operator
would, which egress IP fails and which alerts fire.

Without `prometheus` the test is skipped on a developer's machine and FAILS under CI (env CI set).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.promtool_util import promtool_check_metrics
from tests.harness import (
    ROOT,
    SidecarProcess,
    World,
    free_port,
    metric_value,
    redeem,
    require_tool,
    wait_http_ok,
    wait_until,
)

RULES = ROOT / "deploy" / "prometheus" / "egress-sidecar.rules.yml"
JOB = "egress-sidecar"
TOKENS = "egress_sidecar_token_requests_total"
GOOD_IP, BAD_IP = "127.0.0.2", "127.0.0.3"
INSTALL_HINT = "install it with `apt-get install -y prometheus` (Debian/Ubuntu; Prometheus >= 2.42)"

# The shipped rules are tuned for 30 s scrapes and 1 m evaluation, with windows of 10 m to 1 h and `for:`
# of 3 to 5 m: far too slow for a test. The test copy divides every duration by TIME_SCALE (30, the
# same factor as 30 s -> 1 s scrapes): 10m -> 20s, 1h -> 120s, 3m -> 6s, 5m -> 10s, 15m -> 30s. Only the
# `[range]` windows and `for:` change; selectors, aggregations, thresholds (">= 2", "> 0.25", ">= 10")
# and `and`/`unless` logic stay byte for byte the shipped ones (checked in shortened_rules()). With
# 5 calls/s the threshold of "at least 2 calls" is reached in well under a second, so the compressed
# windows still hold dozens of samples and the alerts behave as they would at production timing.
TIME_SCALE = 30
SCRAPE_INTERVAL = "1s"

CALL_INTERVAL_S = 0.2
MAX_CALLS = 300          # 60 s at one call per 0.2 s
SCENARIO_DEADLINE_S = 60.0


# --- Prometheus binary and rules --------------------------------------------------------------

def require_prometheus() -> str:
    """The prometheus binary ($PROMETHEUS or PATH), or skip (developer machine) / fail (CI)."""
    return require_tool(("prometheus",), "PROMETHEUS", INSTALL_HINT)


_DURATION_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_RANGE_RE = re.compile(r"\[(\w+)\]")


def duration_s(text: str) -> int:
    parts = _DURATION_RE.match(text)
    assert parts and text, f"not a duration this test understands: {text!r}"
    d, h, m, s = (int(p or 0) for p in parts.groups())
    return ((d * 24 + h) * 60 + m) * 60 + s


def shorten(duration: str) -> str:
    seconds = duration_s(duration)
    return f"{0 if seconds == 0 else max(1, seconds // TIME_SCALE)}s"


def shortened_rules(source: Path = RULES) -> dict[str, Any]:
    """The shipped rules with every `[window]` and `for:` divided by TIME_SCALE, nothing else changed."""
    doc = yaml.safe_load(source.read_text(encoding="utf-8"))
    n_alerts = 0
    for group in doc["groups"]:
        assert "interval" not in group, "the test relies on the global evaluation_interval"
        for rule in group["rules"]:
            original = rule["expr"]
            rule["expr"] = _RANGE_RE.sub(lambda m: f"[{shorten(m.group(1))}]", original)
            if "for" in rule:
                rule["for"] = shorten(rule["for"])
            # The transformation must not touch the logic: with the windows blanked out, equal.
            assert _RANGE_RE.sub("[W]", rule["expr"]) == _RANGE_RE.sub("[W]", original)
            n_alerts += "alert" in rule
    assert n_alerts >= 2
    return doc


def test_shortened_rules_keep_the_logic_and_only_scale_durations() -> None:
    # Guards the transformation itself (no Prometheus needed).
    shipped = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    short = shortened_rules()
    pairs = [(a, b) for ga, gb in zip(shipped["groups"], short["groups"], strict=True)
             for a, b in zip(ga["rules"], gb["rules"], strict=True)]
    by_name = {b["alert"]: b for _, b in pairs}
    partial = by_name["SalesforcePartialAllowlist"]
    assert partial["for"] == "6s" and "[20s]" in partial["expr"] and "[120s]" in partial["expr"]
    assert "[10m]" not in partial["expr"] and "[1h]" not in partial["expr"]
    assert by_name["SalesforceEgressNotAllowlisted"]["for"] == "10s"
    for a, b in pairs:
        assert {k: v for k, v in a.items() if k not in ("expr", "for")} == \
               {k: v for k, v in b.items() if k not in ("expr", "for")}
        windows_a = [duration_s(w) for w in _RANGE_RE.findall(a["expr"])]
        windows_b = [duration_s(w) for w in _RANGE_RE.findall(b["expr"])]
        assert [w // TIME_SCALE for w in windows_a] == windows_b


# --- a Prometheus server ------------------------------------------------------------------------

@dataclass
class PrometheusServer:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return data["result"]

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("alerts")["alerts"]

    def firing(self, alertname: str) -> set[str]:
        """egress_ip labels of the firing alerts named ``alertname``."""
        return {a["labels"].get("egress_ip", "") for a in self.alerts()
                if a["labels"]["alertname"] == alertname and a["state"] == "firing"}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_prometheus(binary: str, workdir: Path, admin_port: int, timeout: float = 30.0) -> PrometheusServer:
    workdir.mkdir(parents=True, exist_ok=True)
    rules_path = workdir / "egress-sidecar.rules.test.yml"
    rules_path.write_text(yaml.safe_dump(shortened_rules(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(rules_path)],
        "scrape_configs": [{
            "job_name": JOB,
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}],
        }],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    port = free_port()
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=info"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
        )
    server = PrometheusServer(proc, f"http://127.0.0.1:{port}", log_path)
    problem = wait_http_ok(server.url + "/-/ready", proc, timeout)
    if problem is None:
        return server
    server.stop()
    raise AssertionError(f"prometheus {problem}:\n{server.log_text()[-4000:]}")


@pytest.fixture
def prometheus_binary() -> str:
    return require_prometheus()


@pytest.fixture
def make_prometheus(tmp_path: Path, prometheus_binary: str) -> Iterator[Callable[[int], PrometheusServer]]:
    servers: list[PrometheusServer] = []

    def factory(admin_port: int) -> PrometheusServer:
        server = start_prometheus(prometheus_binary, tmp_path / f"prometheus{len(servers)}", admin_port)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()
        assert server.proc.returncode is not None


# --- the scenario -------------------------------------------------------------------------------

def by_ip(result: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"]["egress_ip"]: float(r["value"][1]) for r in result}


def test_partial_allowlist_seen_and_alerted_by_real_prometheus(
    make_prometheus: Callable[[int], PrometheusServer],  # first: skips before anything is started
    world: World,
    make_sidecar_proc: Callable[..., SidecarProcess],
) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": GOOD_IP, "SIDECAR_GUARD": "observe"})
    assert wait_until(sc.egress_discovered, timeout=10), sc.status()
    assert {m["egress_ip"]: m["allowlisted"] for m in sc.status()["pair"]} == {GOOD_IP: True, BAD_IP: False}
    prom = make_prometheus(sc.admin_port)
    up = f'up{{job="{JOB}"}} == 1'
    assert wait_until(lambda: len(prom.query(up)) == 1, timeout=15, interval=0.25), (
        f"Prometheus never scraped the sidecar: {prom.api('targets')}\n{prom.log_text()[-3000:]}"
    )

    # The app: one refresh token, redeemed every 0.2 s; a rotated token replaces it only on success
    # (Salesforce does not consume a token it refuses for the IP).
    world.salesforce.reset_seen()
    token = world.salesforce.issue_refresh_token()
    client_outcomes: Counter[str] = Counter()
    lint: list[str] | None = None
    both_firing = False
    started = time.monotonic()
    next_poll = started + 1.0
    with sc.session() as s:
        for n in range(MAX_CALLS):
            if time.monotonic() - started > SCENARIO_DEADLINE_S:
                break
            resp = redeem(s, token)
            if resp.status_code == 200:
                client_outcomes["success"] += 1
                token = resp.json()["refresh_token"]
            elif resp.status_code == 400 and "ip restricted" in resp.json().get("error_description", "").lower():
                client_outcomes["ip_restricted"] += 1
            else:
                client_outcomes[f"other {resp.status_code}"] += 1
            if lint is None and n >= 10:
                # A real scrape taken mid-scenario: every series of a running sidecar with traffic.
                lint = promtool_check_metrics(sc.metrics())
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + 1.0
                if BAD_IP in prom.firing("SalesforcePartialAllowlist") and \
                        BAD_IP in prom.firing("SalesforceEgressNotAllowlisted"):
                    both_firing = True
                    break
            time.sleep(CALL_INTERVAL_S)
    elapsed = time.monotonic() - started
    if lint is None:  # fewer than 11 calls: lint the scrape as it stands now
        lint = promtool_check_metrics(sc.metrics())
    alerts = prom.alerts()
    summary = (f"after {elapsed:.1f}s and {sum(client_outcomes.values())} calls ({dict(client_outcomes)}); "
               f"alerts: {[(a['labels']['alertname'], a['labels'].get('egress_ip'), a['state']) for a in alerts]}")

    # The app saw the classic split: every call either succeeded or was refused for its IP.
    assert set(client_outcomes) == {"success", "ip_restricted"}, summary
    assert lint == [], f"promtool check metrics on a real scrape: {lint}"

    # Salesforce's own view: successes came only from the allowlisted IP, refusals only from the other.
    seen = Counter((r.source_ip, r.status) for r in world.salesforce.seen if r.path == "/services/oauth2/token")
    assert set(seen) == {(GOOD_IP, 200), (BAD_IP, 400)}, seen

    # Prometheus, once it has scraped the final counts, stores exactly what Salesforce saw.
    sel = f'{TOKENS}{{job="{JOB}", grant_type="refresh_token"'
    fail_q = f'sum by (egress_ip) ({sel}, outcome="ip_restricted"}}) > 0'
    ok_q = f'sum by (egress_ip) ({sel}, outcome="success"}}) > 0'
    want_fail, want_ok = {BAD_IP: float(seen[(BAD_IP, 400)])}, {GOOD_IP: float(seen[(GOOD_IP, 200)])}
    assert wait_until(lambda: by_ip(prom.query(fail_q)) == want_fail and by_ip(prom.query(ok_q)) == want_ok,
                      timeout=10, interval=0.25), (
        f"Prometheus: ip_restricted {by_ip(prom.query(fail_q))}, success {by_ip(prom.query(ok_q))}; "
        f"Salesforce saw {dict(seen)}; {summary}"
    )
    scraped = sc.metrics()
    assert metric_value(scraped, TOKENS, egress_ip=BAD_IP, outcome="ip_restricted") == want_fail[BAD_IP]
    assert metric_value(scraped, TOKENS, egress_ip=GOOD_IP, outcome="success") == want_ok[GOOD_IP]
    # The same per-IP split over a window, as the dashboard and the alert read it.
    rate_q = f'sum by (egress_ip, outcome) (increase({TOKENS}{{job="{JOB}"}}[20s])) > 0'
    split = {(r["metric"]["egress_ip"], r["metric"]["outcome"]) for r in prom.query(rate_q)}
    assert split == {(GOOD_IP, "success"), (BAD_IP, "ip_restricted")}, split

    # Every test rule loaded and evaluates without error.
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {r["alert"] for g in shortened_rules()["groups"] for r in g["rules"]}
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []

    # The alerts: the partial allowlist pages for the non-allowlisted IP only, and the pre-failure
    # warning names the same IP.
    assert both_firing, f"SalesforcePartialAllowlist and SalesforceEgressNotAllowlisted not both firing {summary}"
    partial = [a for a in alerts if a["labels"]["alertname"] == "SalesforcePartialAllowlist"]
    assert [(a["labels"]["egress_ip"], a["labels"]["job"], a["labels"]["severity"], a["state"]) for a in partial] == \
        [(BAD_IP, JOB, "page", "firing")], summary
    assert BAD_IP in partial[0]["annotations"]["summary"]
    assert "External Client App Manager" in partial[0]["annotations"]["description"]
    assert float(partial[0]["value"]) >= 2
    not_allowlisted = [a for a in alerts if a["labels"]["alertname"] == "SalesforceEgressNotAllowlisted"]
    assert [(a["labels"]["egress_ip"], a["state"]) for a in not_allowlisted] == [(BAD_IP, "firing")], summary
    # Nothing else is wrong with the pair: no member down, no IP change, nothing blocked, no token reuse.
    # (SalesforceTokenFailureRateHigh may join: half the calls fail; Alertmanager inhibits it.)
    # (SalesforceEgressIPRefused may join too: Salesforce refused BAD_IP; it must name that IP only.)
    allowed = {"SalesforcePartialAllowlist", "SalesforceEgressNotAllowlisted", "SalesforceTokenFailureRateHigh",
               "SalesforceEgressIPRefused"}
    assert {a["labels"]["alertname"] for a in alerts} <= allowed, summary
    assert {a["labels"]["egress_ip"] for a in alerts if a["labels"]["alertname"] == "SalesforceEgressIPRefused"} <= \
        {BAD_IP}, summary
