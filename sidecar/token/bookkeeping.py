"""Bookkeeping off the critical path: finished token calls are recorded in batches, after their answers.

When a token call's answer has been written to the app (or the app left), the core hands its flow here
instead of running the ``done`` hooks (the audit trail, the log line and metrics, the grant tracking:
:mod:`sidecar.token.flow`) on the spot. Flows wait in one bounded queue, in the order their calls
finished, and are applied together ``BATCH_DELAY`` seconds after the first of them arrived: every flow
through every ``done`` hook in the addons' order (a failing hook costs only its own record, as before),
with the batch's log lines written to the log stream in one write (:func:`sidecar.logs.batched_lines`).
The profile of issue 22 had a quarter of the sidecar's CPU per keep-alive call in this bookkeeping, one
``call_soon`` and one log write per call; a batch pays the write and the wake-up once.

Bounds, and nothing dropped: the queue holds at most ``BATCH_LIMIT`` flows; the flow that finds it full
has the queued batch applied at once, inline (its own answer is already written; only that call's
coroutine waits), counted in ``egress_sidecar_records_applied_early_total``. ``flush()`` applies whatever
waits: the sidecar calls it when it stops, before the audit trail and the grant store are closed, so the
last calls are recorded, and before the admin server renders ``/metrics`` or ``/status``
(``Sidecar.settle_books``), so a scrape right after a call sees it.

What the guard needs for the very next call is not here: Salesforce's refusals are learnt in the
``upstream_answer`` hook, before the answer is returned (:mod:`addons.evidence`); ``done`` only says
what was learnt (the log line naming a refused IP) and keeps the books. Nor, with replicas on Redis, is
the rotation of a refresh token: the grant tracking learns it in the ``answered`` hook, run here as each call
is handed over, not batched, since the app may redeem the new token on another replica at once and that replica must find it
(on Redis) under the same grant.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar.logs import batched_lines, event

if TYPE_CHECKING:
    from sidecar.token.flow import Hooks, TokenFlow

log = logging.getLogger("egress_sidecar.token")

# A batch is applied this long after its first flow finished. Chosen by measuring the sidecar's CPU per
# keep-alive token call (one client, 5 interleaved rounds of 1000 calls, BENCH_BATCH_DELAY in
# bench/sidecar_variant.py): per call as before 0.64 ms, per loop iteration (0) 0.64 (a sequential client's
# batch then holds one call: nothing is shared), 5 ms 0.60, 10 ms 0.58, 20 ms 0.57, with the record, the audit
# trail and the grant tracking all switched off 0.51. 20 ms is far below anything a person reading the log or a
# scrape (every 15 s or more) could notice.
BATCH_DELAY = 0.02
# At most this many finished calls wait: filling it within BATCH_DELAY takes 200,000 calls a second, far beyond
# what one sidecar serves, so it only bounds memory should the loop stall.
BATCH_LIMIT = 4096


class Bookkeeping:
    """The bounded queue of finished token calls and the batches it applies (on the event loop)."""

    def __init__(self, hooks: Hooks, *, delay: float | None = None, limit: int | None = None,
                 on_early: Callable[[int], None] | None = None) -> None:
        self.hooks = hooks
        self.delay = BATCH_DELAY if delay is None else delay
        self.limit = BATCH_LIMIT if limit is None else limit
        self.on_early = on_early  # told how many records a full queue made apply early (the metric)
        self.early = 0  # records applied early because the queue was full
        self._queue: list[TokenFlow] = []
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, flow: TokenFlow) -> None:
        """A finished call (its answer was written, or its app left): its ``answered`` hooks now, its ``done``
        hooks with the next batch."""
        self.hooks.answered(flow)
        self._queue.append(flow)
        if len(self._queue) >= self.limit:
            n = len(self._queue)
            self.early += n
            if self.on_early is not None:
                self.on_early(n)
            event(log, logging.WARNING, f"{n} token call records were applied at once: the bookkeeping queue was "
                  f"full ({self.limit}); no record was lost", event="records_applied_early", records=n)
            self.flush()
            return
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self.flush)

    def flush(self) -> None:
        """Apply every queued call now, in the order they finished (also at shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._queue = self._queue, []
        with batched_lines():
            for flow in batch:
                self.hooks.done(flow)
