"""Run the real `promtool` from tests (Debian package `prometheus`, /usr/bin/promtool).

    from tests.deploy.promtool_util import promtool_check_metrics
    assert promtool_check_metrics(scraped_text) == []

Without promtool a test that needs it is skipped on a developer's machine and FAILS under CI
(env CI set), where a skipped check would look like a passing one.
"""

from __future__ import annotations

import os
import re
import subprocess

from tests.harness import find_tool, require_tool

# The metrics contract: every series name the sidecar exports and that rules and dashboards may use
# (histogram series as their base name). Written out here, not imported from sidecar.metrics, so a
# rename on either side fails a test instead of silently breaking an alert.
CONTRACT_METRICS = frozenset({
    "egress_sidecar_token_requests_total",
    "egress_sidecar_token_request_duration_seconds",
    "egress_sidecar_tunnels_total",
    "egress_sidecar_egress_ip_allowlisted",
    "egress_sidecar_pair_member_up",
    "egress_sidecar_egress_ip_changes_total",
    "egress_sidecar_allowlist_coverage_ratio",
    "egress_sidecar_refresh_token_rotations_total",
    "egress_sidecar_refresh_token_reuse_total",
    "egress_sidecar_grants_idle",
    "egress_sidecar_grants_tracked",
    "egress_sidecar_member_failures_total",
    "egress_sidecar_failovers_total",
    "egress_sidecar_guard_enforcing",
    "egress_sidecar_direct_mode",
    "egress_sidecar_client_tls_failures_total",
    "egress_sidecar_egress_ip_refused",
    "egress_sidecar_egress_ip_org_refused",
    "egress_sidecar_allowlist_disagreement",
    "egress_sidecar_ip_restricted_retries_total",
    "egress_sidecar_probes_total",
    "egress_sidecar_client_connections",
    "egress_sidecar_connections_refused_total",
    "egress_sidecar_egress_verified",
    "egress_sidecar_egress_checks_total",
    "egress_sidecar_redis_up",
    "egress_sidecar_grants_expiry",
    "egress_sidecar_audit_writes_dropped_total",
    "egress_sidecar_orgs",
})

# Label names per metric, as the rules and the dashboard use them (Prometheus adds job, instance).
CONTRACT_LABELS = {
    "egress_sidecar_token_requests_total": ("grant_type", "member", "egress_ip", "outcome"),
    "egress_sidecar_token_request_duration_seconds": ("member", "egress_ip"),
    "egress_sidecar_tunnels_total": ("route",),
    "egress_sidecar_egress_ip_allowlisted": ("egress_ip",),
    "egress_sidecar_pair_member_up": ("member", "egress_ip"),
    "egress_sidecar_egress_ip_changes_total": ("member",),
    "egress_sidecar_allowlist_coverage_ratio": (),
    "egress_sidecar_refresh_token_rotations_total": ("rotated",),
    "egress_sidecar_refresh_token_reuse_total": (),
    "egress_sidecar_grants_idle": ("window",),
    "egress_sidecar_grants_tracked": (),
    "egress_sidecar_member_failures_total": ("member", "reason"),
    "egress_sidecar_failovers_total": (),
    "egress_sidecar_guard_enforcing": (),
    "egress_sidecar_direct_mode": (),
    "egress_sidecar_client_tls_failures_total": ("reason",),
    "egress_sidecar_egress_ip_refused": ("egress_ip",),
    "egress_sidecar_egress_ip_org_refused": ("egress_ip",),
    "egress_sidecar_allowlist_disagreement": ("egress_ip",),
    "egress_sidecar_ip_restricted_retries_total": ("outcome",),
    "egress_sidecar_probes_total": ("member", "result"),
    "egress_sidecar_client_connections": (),
    "egress_sidecar_connections_refused_total": ("reason",),
    "egress_sidecar_egress_verified": ("member",),
    "egress_sidecar_egress_checks_total": ("member", "result"),
    "egress_sidecar_redis_up": (),
    "egress_sidecar_grants_expiry": ("state",),
    "egress_sidecar_audit_writes_dropped_total": ("reason",),
    "egress_sidecar_orgs": (),
}
assert set(CONTRACT_LABELS) == CONTRACT_METRICS

# A metric name not glued to a recording-rule name (level:metric:operation) or to a longer word.
_METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])egress_sidecar_[a-z_]+(?![A-Za-z0-9_:])")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """The egress_sidecar_* metric names a PromQL expression uses, histogram suffixes stripped."""
    names = set()
    for name in _METRIC_RE.findall(expr):
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        names.add(name)
    return names


INSTALL_HINT = "install it with `apt-get install -y prometheus` (Debian/Ubuntu; promtool >= 2.42)"
TIMEOUT_S = 60


class PromtoolError(RuntimeError):
    """promtool could not process its input at all (as opposed to reporting lint problems)."""


def promtool_path() -> str | None:
    """The promtool binary: $PROMTOOL if set, else the one on PATH, else None."""
    return find_tool(("promtool",), "PROMTOOL")


def require_promtool() -> str:
    """The promtool binary, or skip (developer machine) / fail (CI) the calling test."""
    return require_tool(("promtool",), "PROMTOOL", INSTALL_HINT)


def run_promtool(*args: str | os.PathLike[str], stdin: str | None = None,
                 cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `promtool ARGS...` and return the finished process (never raises on a non-zero exit)."""
    return subprocess.run(
        [require_promtool(), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=cwd,
        check=False,
    )


def promtool_check_metrics(text: str) -> list[str]:
    """Lint a Prometheus text exposition with `promtool check metrics`.

    Returns promtool's lint problems, one string per line (empty list: clean), for example
    'foo counter metrics should have "_total" suffix'. Raises PromtoolError when promtool cannot
    parse the text at all.
    """
    proc = run_promtool("check", "metrics", stdin=text)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 0:
        return []
    if proc.returncode == 3:  # lint problems found
        return [line.strip() for line in output.splitlines() if line.strip()]
    raise PromtoolError(f"promtool check metrics exited {proc.returncode}: {output}")
