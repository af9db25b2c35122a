"""The quickstart's first command: `egress-sidecar demo` runs to completion and tells the story."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.harness import ROOT


def test_demo_reports_both_phases_with_the_right_counts() -> None:
    out = subprocess.run([sys.executable, "-m", "sidecar", "demo", "--calls", "10"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    phase1, phase2 = text.split("Phase 1:")[1].split("Phase 2:")
    assert "10 refresh token redemptions: 5 succeeded, 5 failed with 'ip restricted by app developer'" in phase1
    assert re.search(r"egress IP 127\.0\.0\.2\s+5 success", phase1)
    assert re.search(r"egress IP 127\.0\.0\.3\s+5 ip_restricted", phase1)
    assert "Egress IP 127.0.0.3 is not on the allowlist" in phase1
    assert "10 refresh token redemptions: 10 succeeded, 0 failed" in phase2
    assert "127.0.0.3" not in phase2.split("verdict:")[0]
    assert "/metrics" in text and "/status" in text
    log_path = text.strip().splitlines()[-1].split(": ", 1)[1]
    log = open(log_path).read()
    assert '"event":"token_call"' in log and "demo-proxy-password" not in log
