"""The audit trail's store and export at unit level: retention and the size bound under an injected clock,
writes that never block and never vanish (a full queue, a real full disk: counted and logged), names kept
sealed in the file and opened by the export, the export's filters, formats and summary."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shlex
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.metrics import Metrics
from sidecar.ops.audit import (
    EXPORT_COLUMNS,
    SUMMARY_COLUMNS,
    UNREADABLE,
    Query,
    Reader,
    parse_when,
    write_rows,
)
from sidecar.state.audit import (
    AUDIT_FILE,
    AuditStore,
    Entry,
    connect_readonly,
    count_calls,
)
from tests.harness import ROOT, metric_value, require_tool

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
T0 = 1_750_000_000.0
DAY = 86_400.0
CLIENT_ID = "3MVG9LongConsumerKeyOfAnExternalClientApp0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"
ORG_A, ORG_B = "00D000000000001EAA", "00D000000000002EAA"
USER = "005000000000001AAA"
HOST = "acme-corp.my.salesforce.com"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def entry(at: float, org: str | None = ORG_A, egress_ip: str = "127.0.0.2", outcome: str = "success",
          retried_from: str | None = None, shield: str | None = None, client_id: str = CLIENT_ID) -> Entry:
    return Entry(at, client_id, "3MVG9L…DEFG", org, USER if org else None, "a1b2c3d4e5f6", "refresh_token", HOST,
                 "my_domain", egress_ip, "verified", "127.0.0.2:9293", "pair", "allow", outcome,
                 200 if outcome == "success" else 400, None if outcome == "success" else "invalid_grant", retried_from,
                 shield, 12.5)


def store(tmp_path: Path, clock: Clock | None = None, **kw: object) -> AuditStore:
    metrics = kw.pop("metrics", None)
    on_drop = (lambda reason, n: metrics.audit_writes_dropped.labels(reason).inc(n)) if metrics else None  # type: ignore[attr-defined]
    s = AuditStore(tmp_path / AUDIT_FILE, KEY, retention=kw.pop("retention", 400 * DAY),  # type: ignore[arg-type]
                   max_rows=kw.pop("max_rows", 1_000_000), clock=clock or Clock(), on_drop=on_drop, **kw)  # type: ignore[arg-type]
    s.open()
    s.start()
    return s


def export(path: Path, q: Query = Query(), keys: list[bytes] | None = None, fmt: str = "csv") -> str:
    out = io.StringIO()
    db = connect_readonly(path)
    try:
        write_rows(Reader(db, [KEY] if keys is None else keys).records(q), EXPORT_COLUMNS, fmt, out)
    finally:
        db.close()
    return out.getvalue()


def test_retention_prunes_records_older_than_the_setting(tmp_path: Path) -> None:
    clock = Clock()
    s = store(tmp_path, clock, retention=30 * DAY)
    for age_days in (45, 31, 29, 1, 0):
        s.submit(entry(T0 - age_days * DAY))
    assert s.flush()
    assert count_calls(tmp_path / AUDIT_FILE) == 5
    assert s.prune_now()
    times = [r["time"] for r in csv.DictReader(io.StringIO(export(tmp_path / AUDIT_FILE)))]
    assert len(times) == 3 and times[0].startswith(time.strftime("%Y-%m-%d", time.gmtime(T0 - 29 * DAY)))
    clock.now += 1.5 * DAY  # time passes: the 29-day-old record is now past 30 days
    assert s.prune_now()
    assert count_calls(tmp_path / AUDIT_FILE) == 2
    s.close()


def test_the_size_bound_keeps_the_newest_records(tmp_path: Path) -> None:
    s = store(tmp_path, max_rows=100)
    for i in range(350):
        s.submit(entry(T0 + i))
    assert s.flush() and s.prune_now()
    rows = list(csv.DictReader(io.StringIO(export(tmp_path / AUDIT_FILE))))
    assert len(rows) == 100
    assert rows[0]["time"] == time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(T0 + 250))
    for i in range(350, 2_500):  # a burst past a tenth of the bound prunes without waiting for the schedule
        s.submit(entry(T0 + i))
    assert s.flush()
    assert s.prunes >= 2 and count_calls(tmp_path / AUDIT_FILE) <= 100 + 1_000 + 1_000
    assert s.prune_now() and count_calls(tmp_path / AUDIT_FILE) == 100
    s.close()


def test_a_full_queue_drops_without_waiting_and_counts_and_logs_it(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    s = AuditStore(tmp_path / AUDIT_FILE, KEY, retention=DAY, max_rows=1000, queue_size=3,
                   on_drop=lambda reason, n: metrics.audit_writes_dropped.labels(reason).inc(n))
    s.open()  # (the writer is not started: nothing drains the queue)
    with caplog.at_level(logging.WARNING, logger="egress_sidecar.audit"):
        started = time.monotonic()
        results = [s.submit(entry(T0 + i)) for i in range(50)]
        assert time.monotonic() - started < 5  # (a bound against a hang, not a speed check)
    assert results == [True] * 3 + [False] * 47
    assert metric_value(metrics.render().decode(), "egress_sidecar_audit_writes_dropped_total", reason="queue_full") == 47
    lines = [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]
    assert len(lines) == 1 and "queue is full" in lines[0]  # at most one line a minute
    s.start()
    s.close()  # what was queued is written; the drops held since the line are said at the close
    assert count_calls(tmp_path / AUDIT_FILE) == 3
    assert any("46 audit record(s) not written" in r.getMessage() for r in caplog.records)


def test_a_failed_write_is_counted_and_logged_and_the_writer_goes_on(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    s = store(tmp_path, metrics=metrics)
    s.submit(entry(T0))
    assert s.flush()
    with sqlite3.connect(tmp_path / AUDIT_FILE) as db:  # someone breaks the file's schema under the sidecar
        db.execute("ALTER TABLE calls RENAME TO broken")
    with caplog.at_level(logging.WARNING, logger="egress_sidecar.audit"):
        s.submit(entry(T0 + 1))
        assert s.flush()
    assert s.dropped == 1
    assert metric_value(metrics.render().decode(), "egress_sidecar_audit_writes_dropped_total", reason="write_failed") == 1
    assert any("not written because SQLite failed" in r.getMessage() for r in caplog.records)
    with sqlite3.connect(tmp_path / AUDIT_FILE) as db:
        db.execute("ALTER TABLE broken RENAME TO calls")
    s.submit(entry(T0 + 2))
    assert s.flush()
    assert count_calls(tmp_path / AUDIT_FILE) == 2
    s.close()


FULL_DISK_SCRIPT = """
import json, logging, os, sys, time
sys.path.insert(0, {root!r})
from sidecar.state.audit import AuditStore, Entry, count_calls
from sidecar.logs import setup_logging
setup_logging("json", logging.INFO)
d = sys.argv[1]
s = AuditStore(__import__("pathlib").Path(d) / "audit.sqlite3", bytes(32), retention=86400.0, max_rows=10**6)
s.open(); s.start()
e = lambda i: Entry(time.time(), "3MVG9", "3MVG9", "00D000000000001AAA", None, "ab", "refresh_token", "h", "login",
                    "127.0.0.2", "verified", "m", "pair", "allow", "success", 200, None, None, None, 1.0)
s.submit(e(0)); s.flush()
fd = os.open(os.path.join(d, "filler"), os.O_WRONLY | os.O_CREAT)  # the disk fills up
try:
    while True:
        os.write(fd, b"x" * 4096)
except OSError:
    os.close(fd)
for i in range(1, 400):
    s.submit(e(i))
    if i % 50 == 0:
        s.flush()
s.flush()
full_drops = s.dropped
os.remove(os.path.join(d, "filler"))  # space is freed
for i in range(3):
    s.submit(e(1000 + i))
s.flush(); s.close()
print(json.dumps({{"dropped": full_drops, "written": count_calls(__import__("pathlib").Path(d) / "audit.sqlite3")}}))
"""


def test_a_full_disk_is_said_once_counted_and_writes_resume_when_space_is_freed(tmp_path: Path) -> None:
    """A real full disk: a tmpfs of 256 KiB in a mount namespace of the test's own (no root needed)."""
    unshare = require_tool(("unshare",), "UNSHARE", "apt-get install util-linux")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK_SCRIPT.format(root=str(ROOT)))
    shell = (f"mount -t tmpfs -o size=256k tmpfs {shlex.quote(str(mnt))} && {{ timeout 60 {shlex.quote(sys.executable)} "
             f"{shlex.quote(str(script))} {shlex.quote(str(mnt))}; echo \"exit=$?\" >&2; }}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    proc = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", shell], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    if "exit=" not in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()[:200]}")
    assert "exit=0" in proc.stderr, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    logs = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    full = [r["msg"] for r in logs if "the disk is full" in r["msg"]]
    assert len(full) == 1 and "token calls are not affected" in full[0], full  # said once, not per record
    assert any("writes succeed again" in r["msg"] for r in logs), [r["msg"] for r in logs]
    assert result["dropped"] > 0  # counted
    assert result["written"] == 1 + (399 - result["dropped"]) + 3  # every record is written or counted


def test_the_file_keeps_names_sealed_and_the_export_opens_them(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.submit(entry(T0))
    s.submit(entry(T0 + 1, org=ORG_B, egress_ip="127.0.0.3", outcome="success", retried_from="127.0.0.2"))
    s.submit(entry(T0 + 2, shield="replayed", egress_ip="none"))
    s.submit(entry(T0 + 3, org=None, client_id="3MVG9other"))
    assert s.flush()
    s.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob(AUDIT_FILE + "*"))
    for name in (CLIENT_ID, ORG_A, ORG_B, USER, HOST, ORG_A[:15]):
        assert name.encode() not in raw, f"{name} in clear in {AUDIT_FILE}"
    assert oct(os.stat(tmp_path / AUDIT_FILE).st_mode & 0o777) == "0o600"
    rows = list(csv.DictReader(io.StringIO(export(tmp_path / AUDIT_FILE))))
    assert [(r["app"], r["org_id"], r["user_id"], r["token_host"]) for r in rows[:3]] == [
        (CLIENT_ID, ORG_A, USER, HOST), (CLIENT_ID, ORG_B, USER, HOST), (CLIENT_ID, ORG_A, USER, HOST)]
    assert rows[3]["app"] == "3MVG9other" and rows[3]["org_id"] == "" and rows[3]["user_id"] == ""
    assert (rows[1]["retried"], rows[1]["retried_from"], rows[1]["egress_ip"]) == ("true", "127.0.0.2", "127.0.0.3")
    assert (rows[2]["replayed"], rows[2]["coalesced"], rows[2]["egress_verified"]) == ("true", "false", "true")
    # Under another key the records are still there; their names cannot be opened, and say so.
    blind = list(csv.DictReader(io.StringIO(export(tmp_path / AUDIT_FILE, keys=[OTHER_KEY]))))
    assert [r["egress_ip"] for r in blind] == [r["egress_ip"] for r in rows]
    assert {r["org_id"] for r in blind[:3]} == {UNREADABLE} and blind[0]["app_label"] == "3MVG9L…DEFG"


def test_filters_formats_and_summary(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.submit(entry(T0, egress_ip="127.0.0.3", outcome="ip_restricted"))
    s.submit(entry(T0 + 10, retried_from="127.0.0.3"))
    s.submit(entry(T0 + 20, org=ORG_B))
    s.submit(entry(T0 + 30, client_id="3MVG9other"))
    assert s.flush()
    s.close()
    path = tmp_path / AUDIT_FILE
    db = connect_readonly(path)
    r = Reader(db, [OTHER_KEY, KEY])  # (the key the file was written with is found among those given)

    def orgs(q: Query) -> list[str | None]:
        return [x["org_id"] for x in r.records(q)]

    assert orgs(Query(org=ORG_B)) == [ORG_B]
    assert orgs(Query(org=ORG_A[:15])) == [ORG_A, ORG_A, ORG_A]
    assert len(orgs(Query(app=CLIENT_ID))) == 3 and len(orgs(Query(app="3MVG9L…DEFG"))) == 4  # label: every app
    assert len(orgs(Query(app="3MVG9other"))) == 1 and orgs(Query(app="nobody")) == []
    assert len(orgs(Query(since=T0 + 10, until=T0 + 30))) == 2
    summary = {(x["org_id"], x["egress_ip"]): x for x in r.summary(Query())}
    assert summary[(ORG_A, "127.0.0.3")]["ip_restricted"] == 2 and summary[(ORG_A, "127.0.0.3")]["calls"] == 2
    assert summary[(ORG_A, "127.0.0.2")]["success"] == 2 and summary[(ORG_B, "127.0.0.2")]["calls"] == 1
    assert summary[(ORG_A, "127.0.0.3")]["first_seen"] == "2025-06-15T15:06:40.000Z"
    out = io.StringIO()
    assert write_rows(r.summary(Query(org=ORG_B)), SUMMARY_COLUMNS, "csv", out) == 1
    assert out.getvalue().splitlines()[0] == ",".join(SUMMARY_COLUMNS)
    lines = export(path, Query(org=ORG_B), fmt="json").splitlines()
    assert len(lines) == 1 and list(json.loads(lines[0])) == list(EXPORT_COLUMNS)
    assert json.loads(lines[0])["retried"] is False and json.loads(lines[0])["status"] == 200
    db.close()


def test_when_accepts_dates_times_and_durations_ago() -> None:
    assert parse_when("2026-11-01") == parse_when("2026-11-01T00:00:00Z") == 1_793_491_200.0
    assert parse_when("2026-11-01T01:00:00+01:00") == 1_793_491_200.0
    assert parse_when("7d", now=T0) == T0 - 7 * DAY and parse_when("90m", now=T0) == T0 - 5400
    with pytest.raises(ValueError, match="neither a time"):
        parse_when("yesterday")


def test_a_file_that_is_not_a_trail_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        connect_readonly(tmp_path / AUDIT_FILE)
    (tmp_path / AUDIT_FILE).write_bytes(b"not sqlite at all, long enough to be looked at" * 20)
    with pytest.raises(ValueError, match="not an audit trail"):
        connect_readonly(tmp_path / AUDIT_FILE)


def test_a_record_the_writer_cannot_handle_is_counted_and_the_writer_goes_on(tmp_path: Path) -> None:
    metrics = Metrics()
    s = store(tmp_path, metrics=metrics)
    bad = entry(T0)
    bad.org = 12345  # type: ignore[assignment]  # a bug upstream: not a string
    s.submit(bad)
    s.submit(entry(T0 + 1))
    assert s.flush()
    s.submit(entry(T0 + 2))
    assert s.flush()
    assert count_calls(tmp_path / AUDIT_FILE) == 2  # the bad one costs only itself
    assert s.dropped == 1
    assert metric_value(metrics.render().decode(), "egress_sidecar_audit_writes_dropped_total", reason="write_failed") == 1
    s.close()
