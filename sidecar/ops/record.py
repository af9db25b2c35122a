"""The end of a token call's journey: one record becomes one log line and its metrics.

Nothing is decided here; the record arrives complete (route, member, egress IP, guard verdict,
outcome, timings) and is written out once, so logs and metrics can never disagree.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from typing import Any

from sidecar.logs import event
from sidecar.metrics import GRANT_TYPES, Metrics
from sidecar.token.call import TokenCall

log = logging.getLogger("egress_sidecar.token")
RECENT = 50


class Recorder:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.by_egress: dict[str, Counter[str]] = {}
        self._lock = threading.Lock()  # the admin server reads from another thread
        # The metrics' children by label values, looked up once: ``labels()`` validates and locks on every call
        # (it showed in the profile of the per-call record). Bounded as the labels are (metrics.py).
        self._requests: dict[tuple[str, str, str, str], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}

    def _requests_child(self, key: tuple[str, str, str, str]) -> Any:
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.metrics.token_requests.labels(*key)
        return child

    def record(self, call: TokenCall) -> None:
        assert call.outcome is not None
        grant = call.grant_type if call.grant_type in GRANT_TYPES else "other"
        self._requests_child((grant, call.member, call.egress_ip, call.outcome)).inc()
        if call.duration is not None and call.outcome != "blocked":
            key = (call.member, call.egress_ip)
            child = self._durations.get(key)
            if child is None:
                child = self._durations[key] = self.metrics.token_duration.labels(*key)
            child.observe(call.duration)
        if call.retried_from:  # Salesforce's first answer counts too: it is what the allowlist alerts look at
            member, ip = call.retried_from
            self._requests_child((grant, member, ip, "ip_restricted")).inc()
        fields = call.log_fields()
        # One line per call, and the only one: what the guard saw (observe mode lets a call leave from an IP
        # that is not allowlisted) is said here, not in a second line.
        level = logging.INFO if call.outcome == "success" and not call.retried_from and call.guard != \
            "not_allowlisted" else logging.WARNING
        event(log, level, _message(call), **fields)
        with self._lock:
            self.recent.append({**fields, "at": round(call.started, 3)})  # (the status page shows its time)
            self.by_egress.setdefault(call.egress_ip, Counter())[call.outcome] += 1
            if call.retried_from:
                self.by_egress.setdefault(call.retried_from[1], Counter())["ip_restricted"] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "recent": list(self.recent),
                "outcomes_by_egress_ip": {ip: dict(c) for ip, c in self.by_egress.items()},
            }


def _message(call: TokenCall) -> str:
    via = f"via {call.member} ({call.egress_ip})" if call.route == "pair" else call.route
    text = f"token call {call.grant_type} {via}: {call.outcome}"
    if call.retried_from:
        text += (f" (retried: Salesforce first refused egress IP {call.retried_from[1]} as ip restricted; add it to "
                 "the External Client App's Refresh Token IP Allowlist)")
    if call.guard == "not_allowlisted" and not call.retried_from:
        text += (f" - it left from {call.egress_ip}, which is not allowlisted (SIDECAR_ALLOWLIST, or Salesforce "
                 "refused it before); the guard observes, SIDECAR_GUARD=enforce would route around it")
    elif call.outcome == "ip_restricted":
        text += (
            f" - Salesforce rejected egress IP {call.egress_ip}: add it to the External Client App's "
            "Refresh Token IP Allowlist"
        )
    return text
