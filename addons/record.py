"""The record: every token call becomes one log line and its metrics, once, after the app has its answer.

Nothing is decided here; the call's record arrives complete (route, member, egress IP, guard verdict,
outcome, timings) and is written out once, so the log line and the metrics can never disagree
(:class:`sidecar.ops.record.Recorder`).
"""

from __future__ import annotations

from sidecar.metrics import Metrics
from sidecar.ops.record import Recorder
from sidecar.token.flow import TokenFlow


class Record:
    def __init__(self, recorder: Recorder, metrics: Metrics) -> None:
        self.recorder = recorder
        self.metrics = metrics

    def done(self, flow: TokenFlow) -> None:
        call = flow.call
        self.recorder.record(call)
        if call.failovers:
            self.metrics.failovers.inc(call.failovers)
        if call.retry_outcome is not None:
            self.metrics.ip_restricted_retries.labels(call.retry_outcome).inc()
