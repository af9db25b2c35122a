"""Write deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/egress-sidecar.rules.yml.

The plain rules file is the one source of truth; the Prometheus Operator resource embeds it
verbatim (comments included) under `spec:`, so both always hold the same groups.

    python deploy/prometheus/render_prometheusrule.py          # rewrite the resource
    python deploy/prometheus/render_prometheusrule.py --check  # exit 1 if it is out of date

Standard library only, so it runs anywhere Python does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent
RULES = DEPLOY / "prometheus" / "egress-sidecar.rules.yml"
RESOURCE = DEPLOY / "kubernetes" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/egress-sidecar.rules.yml by
# deploy/prometheus/render_prometheusrule.py: edit the rules file and re-run the script, do not edit
# this file (tests/deploy/test_alert_rules.py fails when they differ).
#
# kube-prometheus-stack only loads PrometheusRules whose labels match its ruleSelector (by default
# `release: <helm release name>`): add that label here, or through kustomize, if yours needs it.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: egress-sidecar
  labels:
    app.kubernetes.io/name: egress-sidecar
    app.kubernetes.io/component: egress-proxy
spec:
"""


def render(rules_text: str) -> str:
    """The PrometheusRule text: the rules file's body indented under `spec:`."""
    lines = rules_text.splitlines()
    # The rules file's own header comment describes the plain file; keep from `groups:` on.
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "".join(f"  {line}\n" if line.strip() else "\n" for line in lines[start:])
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the resource is up to date")
    args = parser.parse_args(argv)
    wanted = render(RULES.read_text(encoding="utf-8"))
    current = RESOURCE.read_text(encoding="utf-8") if RESOURCE.exists() else ""
    if args.check:
        if current != wanted:
            print(f"{RESOURCE} is out of date: run python {Path(__file__).relative_to(DEPLOY.parent)}", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        RESOURCE.write_text(wanted, encoding="utf-8")
        print(f"wrote {RESOURCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
