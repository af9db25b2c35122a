"""The record of finished token calls, off the critical path (sidecar/token/bookkeeping.py, issue 22): batches
arrive whole and in order, in one write of the log stream; a full queue records early and says so; a failing
hook costs only its record; the app has its answer before its record is applied; a stop records what waits.

The first tests run the real addons (the record, the grant tracking) on an event loop with no sockets; the
last ones run the real sidecar in this process in front of the simulated pair and Salesforce."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

import sidecar.logs
from addons.record import Record
from sidecar.app.demo import BackgroundSidecar
from sidecar.app.service import Sidecar
from sidecar.config import load_settings
from sidecar.logs import setup_logging
from sidecar.metrics import Metrics
from sidecar.ops.record import Recorder
from sidecar.sim.certs import TestCA
from sidecar.state.audit import count_calls
from sidecar.token.bookkeeping import BATCH_DELAY, Bookkeeping
from sidecar.token.call import TokenCall
from sidecar.token.flow import Hooks, TokenFlow
from tests.harness import World, metric_value, redeem, sidecar_env, wait_until
from tests.redis_server import REDIS_KEY, RedisServer

GRANTS = ("refresh_token", "authorization_code", "jwt_bearer", "client_credentials", "password")


def finished(i: int) -> TokenFlow:
    """A finished call, told apart from the others by its grant type and its duration (``i`` ms)."""
    call = TokenCall(started=float(i), host_class="login", grant_type=GRANTS[i % len(GRANTS)])  # type: ignore[arg-type]
    call.route, call.member, call.egress_ip, call.outcome, call.status = "pair", "127.0.0.2:9293", "52.0.0.1", \
        "success", 200
    call.duration = i / 1000
    return TokenFlow(call)


class CountingStream(io.StringIO):
    """The log stream, counting the writes it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


SWITCHES = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing", "logAsyncioTasks")


@pytest.fixture
def log_stream() -> Iterator[CountingStream]:
    """The sidecar's own log handler (as ``run`` sets it up) writing to a stream the test reads; the
    root logger's handlers are put back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    switches = {name: getattr(logging, name) for name in SWITCHES}
    stream = CountingStream()
    setup_logging("json", logging.INFO, stream=stream)
    try:
        yield stream
    finally:
        for name, value in switches.items():
            setattr(logging, name, value)
        sidecar.logs._HANDLER = None  # (batched_lines holds nothing any more)
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def token_lines(stream: io.StringIO) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if line.get("event") == "token_call"]


def test_a_batch_arrives_whole_and_in_order_in_one_write_of_the_log_and_in_the_metrics(
        log_stream: CountingStream) -> None:
    metrics = Metrics()
    recorder = Recorder(metrics)
    books = Bookkeeping(Hooks([Record(recorder, metrics)]))

    async def calls() -> tuple[int, int]:
        for i in range(12):
            books.add(finished(i))
        pending = len(token_lines(log_stream))  # nothing is applied while the calls finish
        await asyncio.sleep(BATCH_DELAY * 3)
        return pending, len(books)

    writes_before = log_stream.writes
    assert asyncio.run(calls()) == (0, 0)
    lines = token_lines(log_stream)
    assert [line["duration_ms"] for line in lines] == [float(i) for i in range(12)]  # whole, in order
    assert [line["grant_type"] for line in lines] == [GRANTS[i % len(GRANTS)] for i in range(12)]
    assert log_stream.writes - writes_before == 1  # the batch's twelve lines in one write
    text = metrics.render().decode()
    for grant in GRANTS:
        assert metric_value(text, "egress_sidecar_token_requests_total", grant_type=grant, outcome="success") == \
            len([i for i in range(12) if GRANTS[i % len(GRANTS)] == grant])
    assert metric_value(text, "egress_sidecar_token_request_duration_seconds_count") == 12
    assert [r["duration_ms"] for r in recorder.snapshot()["recent"]] == [float(i) for i in range(12)]


def test_a_full_queue_records_the_batch_at_once_counts_it_and_drops_nothing(log_stream: CountingStream) -> None:
    metrics = Metrics()
    recorder = Recorder(metrics)
    books = Bookkeeping(Hooks([Record(recorder, metrics)]), limit=5, on_early=metrics.records_applied_early.inc)

    async def calls() -> int:
        for i in range(7):
            books.add(finished(i))
        early = len(token_lines(log_stream))  # the first five, at the fifth: the queue was full
        await asyncio.sleep(BATCH_DELAY * 3)
        return early

    assert asyncio.run(calls()) == 5
    assert [line["duration_ms"] for line in token_lines(log_stream)] == [float(i) for i in range(7)]
    assert metric_value(metrics.render().decode(), "egress_sidecar_records_applied_early_total") == 5
    said = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    assert [line["records"] for line in said if line.get("event") == "records_applied_early"] == [5]


def test_the_sidecar_counts_records_applied_early_in_its_metric(tmp_path: Path) -> None:
    sidecar = Sidecar(load_settings({"SIDECAR_CONFDIR": str(tmp_path / "confdir")}))
    books = sidecar.core.books
    books.limit = 2

    async def calls() -> None:
        for i in range(2):
            books.add(finished(i))  # (no addon opened its store: the record addon still counts them)

    asyncio.run(calls())
    assert metric_value(sidecar.metrics.render().decode(), "egress_sidecar_records_applied_early_total") == 2


def test_a_failing_hook_costs_only_its_own_record(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[float] = []

    class Fragile:
        def done(self, flow: TokenFlow) -> None:
            if flow.call.started == 1.0:
                raise RuntimeError("bookkeeping bug")

    class Witness:
        def done(self, flow: TokenFlow) -> None:
            seen.append(flow.call.started)

    books = Bookkeeping(Hooks([Fragile(), Witness()]))

    async def calls() -> None:
        for i in range(3):
            books.add(finished(i))
        await asyncio.sleep(BATCH_DELAY * 3)

    with caplog.at_level(logging.ERROR, logger="egress_sidecar.addons"):
        asyncio.run(calls())
    assert seen == [0.0, 1.0, 2.0]  # the hook after the failing one still saw that call, and the batch went on
    assert [r.getMessage() for r in caplog.records if "Fragile.done failed" in r.getMessage()] == [
        "addon Fragile.done failed (RuntimeError); the token call was not affected"]


# -- the real sidecar, in this process --------------------------------------------------------------------------
def inproc(world: World, test_ca: TestCA, tmp_path: Path, allowlist: str | None = "127.0.0.2,127.0.0.3",
           extra: dict[str, str] | None = None) -> Sidecar:
    env = sidecar_env(tmp_path, test_ca.ca_path, {**world.pair_env(), **({"SIDECAR_ALLOWLIST": allowlist} if allowlist
                                                                          else {}), **(extra or {})})
    return Sidecar(load_settings({k: v for k, v in env.items()
                                  if k.startswith("SIDECAR_") or k == "QUOTAGUARDSTATIC_URL"}))


def session(sidecar: Sidecar) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.proxies = {"https": sidecar.proxy_url}
    s.verify = str(sidecar.settings.trust_dir_path / "ca-bundle.pem")
    return s


def with_addon(sidecar: Sidecar, addon: object) -> None:
    """``addon`` last among the sidecar's addons (its done hook runs after the record's)."""
    sidecar.core.hooks = sidecar.core.books.hooks = Hooks((*sidecar.addons, addon))


def test_the_app_has_its_answer_before_its_record_is_applied(world: World, test_ca: TestCA, tmp_path: Path) -> None:
    """An addon whose done hook waits (bounded) until the client has read its answer: were the record applied
    before the answer was written, the client could never read it while the hook holds the event loop."""
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    answered = threading.Event()
    saw: list[bool] = []

    class Patient:
        def done(self, flow: TokenFlow) -> None:
            saw.append(answered.wait(5))

    sidecar = inproc(world, test_ca, tmp_path)
    with_addon(sidecar, Patient())
    with BackgroundSidecar(sidecar), session(sidecar) as s:
        for n in range(1, 4):
            answered.clear()
            resp = redeem(s, world.salesforce.issue_refresh_token())
            answered.set()
            assert resp.status_code == 200, resp.text
            assert wait_until(lambda: len(saw) == n, timeout=10)  # (before the next call clears the event)
    assert saw == [True, True, True]
    assert len(sidecar.recorder.snapshot()["recent"]) == 3


def test_a_stop_records_the_calls_still_waiting_for_their_batch(
        world: World, test_ca: TestCA, tmp_path: Path) -> None:
    """The batch's timer is set an hour away: only the stop can record the calls, and it must (the log
    line, the metrics, the audit row and the grant tracking of each)."""
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sidecar = inproc(world, test_ca, tmp_path)
    sidecar.core.books.delay = 3600.0
    with BackgroundSidecar(sidecar), session(sidecar) as s:
        token = world.salesforce.issue_refresh_token()
        for _ in range(4):
            resp = redeem(s, token)
            assert resp.status_code == 200, resp.text
            token = resp.json()["refresh_token"]
        assert wait_until(lambda: len(sidecar.core.books) == 4, timeout=5)  # (queued just after each answer)
        assert sidecar.recorder.snapshot()["recent"] == []  # (the batch waits)
    assert len(sidecar.core.books) == 0
    assert [r["outcome"] for r in sidecar.recorder.snapshot()["recent"]] == ["success"] * 4
    assert metric_value(sidecar.metrics.render().decode(), "egress_sidecar_token_requests_total",
                        outcome="success") == 4
    grants = sidecar.grants.snapshot()[0]
    assert len(grants) == 1 and grants[0].rotations == 4, grants
    assert sidecar.audit.store is not None
    assert count_calls(sidecar.audit.store.path) == 4


@pytest.mark.parametrize("on_redis", [True, False], ids=["replicas-on-redis", "alone"])
def test_with_replicas_a_rotation_is_tracked_at_once_while_the_records_wait_for_their_batch(
        world: World, test_ca: TestCA, tmp_path: Path, redis_server: Callable[[], RedisServer], on_redis: bool) -> None:
    """The batch's timer is set an hour away. With replicas on Redis the grant tracking knows each rotated
    token as soon as its answer went out (the app may redeem it on another replica at once), while the log
    line and the audit row wait for the batch; alone, the tracking waits for the batch with them (cheaper per
    call, and nobody else asks)."""
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    extra = {"SIDECAR_REDIS_URL": redis_server().url, "SIDECAR_REDIS_KEY": REDIS_KEY} if on_redis else {}
    sidecar = inproc(world, test_ca, tmp_path, extra=extra)
    sidecar.core.books.delay = 3600.0
    with BackgroundSidecar(sidecar), session(sidecar) as s:
        token = world.salesforce.issue_refresh_token()
        first = None
        for n in range(1, 4):
            resp = redeem(s, token)
            assert resp.status_code == 200, resp.text
            token = resp.json()["refresh_token"]
            assert wait_until(lambda n=n: len(sidecar.core.books) == n, timeout=5)  # (the records wait)
            h = sidecar.grants.token_key(token)
            assert h is not None
            if not on_redis:
                assert sidecar.grants.grant_of(h) is None  # (tracked with the batch)
                continue
            # (in order, through the tracker's own queue and Redis: a moment, not the batch's hour)
            assert wait_until(lambda h=h: sidecar.grants.grant_of(h) is not None, timeout=5), \
                f"rotation {n} is not tracked while its record waits"
            assert len(sidecar.core.books) == n
            found = sidecar.grants.grant_of(h)
            assert found is not None
            first = first or found[0]
            assert found[0] == first  # one grant, followed across its rotations
        assert sidecar.recorder.snapshot()["recent"] == []
    grants = sidecar.grants.snapshot()[0]
    assert len(grants) == 1 and grants[0].rotations == 3, grants  # (alone: applied at the stop)


def test_a_scrape_or_a_look_at_the_status_right_after_a_call_sees_it(
        world: World, test_ca: TestCA, tmp_path: Path) -> None:
    """The batch's timer is set an hour away: /metrics and /status (read from the admin server's threads)
    apply the waiting records on the event loop first, so what they show includes every answered call."""
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sidecar = inproc(world, test_ca, tmp_path)
    sidecar.core.books.delay = 3600.0
    with BackgroundSidecar(sidecar), session(sidecar) as s:
        admin = "http://{}:{}".format(*sidecar.admin.address) if sidecar.admin else None
        assert admin is not None
        resp = redeem(s, world.salesforce.issue_refresh_token())
        assert resp.status_code == 200, resp.text
        assert wait_until(lambda: len(sidecar.core.books) == 1, timeout=5)  # (held)
        with urllib.request.urlopen(admin + "/metrics", timeout=5) as r:
            text = r.read().decode()
        assert metric_value(text, "egress_sidecar_token_requests_total", outcome="success") == 1
        assert len(sidecar.core.books) == 0
        resp = redeem(s, world.salesforce.issue_refresh_token())
        assert wait_until(lambda: len(sidecar.core.books) == 1, timeout=5)
        with urllib.request.urlopen(admin + "/status", timeout=5) as r:
            status = json.loads(r.read())
        assert len(status["recent"]) == 2, status["recent"]


def test_the_guard_keeps_the_next_call_off_a_refused_ip_while_the_records_still_wait(
        world: World, test_ca: TestCA, tmp_path: Path) -> None:
    """What the guard needs for the next call is learnt before the answer (``upstream_answer``), not in the
    batched records: with every record held, Salesforce's one "ip restricted" refusal through 127.0.0.3 is
    retried through 127.0.0.2 and no later call goes to 127.0.0.3."""
    sidecar = inproc(world, test_ca, tmp_path, allowlist=None)  # (Salesforce allowlists 127.0.0.2 only)
    sidecar.core.books.delay = 3600.0
    with BackgroundSidecar(sidecar), session(sidecar) as s:
        assert wait_until(lambda: all(m.egress_ip for m in sidecar.pair.members), timeout=10)
        world.salesforce.reset_seen()
        token, statuses = world.salesforce.issue_refresh_token(), []
        for _ in range(6):
            resp = redeem(s, token)
            statuses.append(resp.status_code)
            token = resp.json()["refresh_token"] if resp.status_code == 200 else token
        assert wait_until(lambda: len(sidecar.core.books) == 6, timeout=5)  # none of them recorded yet
        refused = [r.source_ip for r in world.salesforce.seen if r.status == 400]
        assert statuses == [200] * 6
        assert refused == ["127.0.0.3"]
        assert len(world.salesforce.seen) == 7
