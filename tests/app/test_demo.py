"""The quickstart's first command: `egress-sidecar demo` runs to completion and tells the story."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.harness import ROOT


def test_demo_reports_all_four_phases_with_the_right_counts() -> None:
    out = subprocess.run([sys.executable, "-m", "sidecar", "demo", "--calls", "10"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    phase1, rest = text.split("Phase 1:")[1].split("Phase 2:")
    phase2, rest = rest.split("Phase 3:")
    phase3, phase4 = rest.split("Phase 4:")
    assert "10 refresh token redemptions: 5 succeeded, the app saw 5 fail" in phase1
    assert re.search(r"egress IP 127\.0\.0\.2\s+5 success", phase1)
    assert re.search(r"egress IP 127\.0\.0\.3\s+5 ip_restricted", phase1)
    assert "Salesforce refused egress IP 127.0.0.3 for app 3MVG9demo" in phase1
    assert "10 refresh token redemptions: 10 succeeded, the app saw 0 fail" in phase2
    assert "127.0.0.3" not in phase2.split("verdict:")[0]
    # No allowlist configured: the guard learns it from Salesforce's one refusal, the app sees none.
    assert "NO SIDECAR_ALLOWLIST" in phase3
    assert "10 refresh token redemptions: 10 succeeded, the app saw 0 fail (Salesforce refused 1" in phase3
    assert re.search(r"egress IP 127\.0\.0\.3\s+1 ip_restricted", phase3)
    assert "Salesforce refused egress IP 127.0.0.3" in phase3.split("verdict:")[1]
    # An ISV: org B's own IP restriction refuses 127.0.0.3 with the same answer; only org B is kept off it.
    assert "two customer orgs" in phase4 and "10 refresh token redemptions: 10 succeeded, the app saw 0 fail" in phase4
    org_b = re.search(r"org B \((00D\w+)\): (.*); the app saw 0 fail", phase4)
    org_a = re.search(r"org A \((00D\w+)\): (.*); the app saw 0 fail", phase4)
    assert org_b and org_a, phase4
    assert "1 refused through 127.0.0.3" in org_b.group(2) and "succeeded through 127.0.0.3" not in org_b.group(2)
    assert re.search(r"\d+ succeeded through 127\.0\.0\.3", org_a.group(2)), org_a.group(2)
    verdict4 = phase4.split("verdict:")[1]
    assert f"org {org_b.group(1)} only" in verdict4 and "The fix is on the customer's side" in verdict4
    assert org_a.group(1) not in verdict4
    assert "/metrics" in text and "/status" in text
    log_path = text.strip().splitlines()[-1].split(": ", 1)[1]
    log = open(log_path).read()
    assert '"event":"token_call"' in log and "demo-proxy-password" not in log
