"""The audit trail end to end: the real sidecar in front of the simulated pair and a Salesforce that names
each grant's org, real clients, and ``egress-sidecar audit`` as an operator runs it (while the sidecar runs,
and after it stopped). What Salesforce saw (source IP, org, answer) is the truth the export must match."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import requests

from sidecar.state.audit import AUDIT_FILE, count_calls
from tests.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    PROXY_PASS,
    ROOT,
    TOKEN_URL,
    SidecarProcess,
    World,
    iter_written_files,
    metric_value,
    redeem,
    wait_until,
)
from tests.redis_server import REDIS_KEY, RedisServer

GOOD, BAD = "127.0.0.2", "127.0.0.3"


def audit_cli(sc: SidecarProcess, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """``egress-sidecar audit`` as an operator runs it: the sidecar's environment."""
    out = subprocess.run([sys.executable, "-m", "sidecar", "audit", *args], env=sc.env, capture_output=True, text=True,
                         timeout=60, cwd=ROOT, check=False)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def audit_csv(sc: SidecarProcess, *args: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(audit_cli(sc, "--format", "csv", *args).stdout)))


def audit_json(sc: SidecarProcess, *args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit_cli(sc, "--format", "json", *args).stdout.splitlines()]


class App:
    """A correct app: keeps each rotated refresh token (the old one after a failure), collecting every secret it
    handles so the test can look for them."""

    def __init__(self, world: World, sc: SidecarProcess) -> None:
        self.world, self.sc = world, sc
        self.secrets: list[str] = [CLIENT_SECRET, PROXY_PASS]
        self.calls = 0

    def keep(self, resp: requests.Response) -> requests.Response:
        self.calls += 1
        if resp.ok:
            body = resp.json()
            self.secrets += [body["refresh_token"], body["access_token"].partition("!")[2]]
        return resp

    def grant(self, org: str) -> str:
        token = self.world.salesforce.issue_refresh_token(org)
        self.secrets.append(token)
        return token

    def refresh(self, token: str) -> str:
        with self.sc.session() as s:
            resp = self.keep(redeem(s, token))
        return resp.json()["refresh_token"] if resp.ok else token

    def code_flow(self, org: str) -> str:
        code = self.world.salesforce.issue_auth_code(org)
        self.secrets.append(code)
        with self.sc.session() as s:
            resp = self.keep(s.post(TOKEN_URL, data={"grant_type": "authorization_code", "code": code,
                                                     "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                                                     "redirect_uri": "https://app.example.com/cb"}, timeout=15))
        assert resp.status_code == 200, resp.text
        return resp.json()["refresh_token"]


def test_the_export_lists_every_call_of_two_orgs_with_the_egress_ip_salesforce_saw_and_no_secret(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sf = world.salesforce
    sf.set_allowlist([GOOD])  # 127.0.0.3 is refused: each org's first redemption through it is retried via .2
    org_a, org_b = sf.add_org(), sf.add_org()
    sc = make_sidecar_proc(world.pair_env())
    assert wait_until(sc.egress_discovered, timeout=10)
    sf.reset_seen()
    app = App(world, sc)
    a, b = app.grant(org_a), app.grant(org_b)
    for _ in range(4):
        a, b = app.refresh(a), app.refresh(b)
    with sc.session() as s:  # the same redemption twice: the rotation shield answers the second (replayed)
        form = {"grant_type": "refresh_token", "refresh_token": a, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        first, again = app.keep(s.post(TOKEN_URL, data=form, timeout=15)), app.keep(s.post(TOKEN_URL, data=form, timeout=15))
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    a = first.json()["refresh_token"]
    c = app.code_flow(org_a)  # a second grant of org A, from the web server flow
    c = app.refresh(c)

    # While the sidecar runs: every call is there, in order, with what Salesforce saw.
    assert wait_until(lambda: count_calls(sc.confdir / AUDIT_FILE) == app.calls, timeout=10)
    rows = audit_csv(sc)
    assert len(rows) == app.calls
    assert list(rows[0]) == ["time", "app", "app_label", "org_id", "user_id", "grant", "grant_type", "token_host",
                             "host_class", "egress_ip", "egress_verified", "egress", "member", "route", "guard",
                             "outcome", "status", "sf_error", "retried", "retried_from", "coalesced", "replayed",
                             "duration_ms"]
    sent = []  # what each row says Salesforce saw: (source IP, org, status), a retried call's refusal first
    for r in rows:
        assert r["app"] == CLIENT_ID and r["token_host"] == "login.salesforce.com" and r["org_id"] in (org_a, org_b)
        assert r["user_id"] == sf.user_of(r["org_id"])
        if r["replayed"] == "true":
            assert r["egress_ip"] == "none" and r["outcome"] == "success"
            continue
        assert r["egress_verified"] == "true" and r["egress"] == "verified", r
        if r["retried"] == "true":
            sent.append((r["retried_from"], r["org_id"], 400))
        sent.append((r["egress_ip"], r["org_id"], int(r["status"])))
    seen = [(q.source_ip, q.org_id, q.status) for q in sf.seen if q.path == "/services/oauth2/token"]
    assert sent == seen
    assert Counter(ip for ip, _, status in seen if status == 400) == Counter({BAD: 2}), seen  # one refusal per org
    assert sum(r["retried"] == "true" for r in rows) == 2 and sum(r["replayed"] == "true" for r in rows) == 1
    assert all(r["outcome"] == "success" for r in rows)

    # The grants: one id per chain, as `egress-sidecar grants` shows them, grouped by org.
    chains = {(r["org_id"], r["grant"]) for r in rows}
    assert len(chains) == 3 and len({g for _, g in chains}) == 3, chains
    listed = json.loads(subprocess.run([sys.executable, "-m", "sidecar", "grants", "--json"], env=sc.env,
                                       capture_output=True, text=True, timeout=30, cwd=ROOT, check=True).stdout)
    assert {(g["org"], g["grant_id"]) for g in listed["grants"]} == chains
    assert {o["org"]: o["grants"] for o in listed["orgs"]} == {org_a: 2, org_b: 1}

    # The log line of each call carries the same record.
    lines = sc.log_events()
    assert [(e["org"], e["grant"], e["egress_ip"]) for e in lines] == [(r["org_id"], r["grant"], r["egress_ip"])
                                                                        for r in rows]

    # JSON lines, the filters, the summary.
    as_json = audit_json(sc)
    assert [(j["org_id"], j["egress_ip"], j["retried"], j["status"]) for j in as_json] == \
        [(r["org_id"], r["egress_ip"], r["retried"] == "true", int(r["status"])) for r in rows]
    assert [r["org_id"] for r in audit_csv(sc, "--org", org_b)] == [org_b] * 4
    assert len(audit_csv(sc, "--org", org_a[:15])) == app.calls - 4  # the 15-character form of the id
    assert len(audit_csv(sc, "--app", CLIENT_ID)) == app.calls and audit_csv(sc, "--app", "3MVG9other") == []
    assert len(audit_csv(sc, "--since", "1h")) == app.calls and audit_csv(sc, "--until", "1h") == []
    summary = {(r["org_id"], r["egress_ip"]): r for r in audit_csv(sc, "--summary")}
    for (org, ip), r in summary.items():
        assert int(r["calls"]) == sum(1 for q in seen if (q[0], q[1]) == (ip, org)) + \
            (1 if ip == "none" else 0), (org, ip, r)
        assert int(r["ip_restricted"]) == sum(1 for q in seen if q == (ip, org, 400))
    assert int(summary[(org_a, BAD)]["ip_restricted"]) == int(summary[(org_b, BAD)]["ip_restricted"]) == 1

    # /status: the per-org table, with the egress IPs each org's calls left from.
    orgs = sc.status()["orgs"]
    assert orgs["total"] == 2 and orgs["page"] == 1 and orgs["pages"] == 1
    by_org = {r["org"]: r for r in orgs["rows"]}
    for org in (org_a, org_b):
        assert by_org[org]["refusals"] == 1 and by_org[org]["egress_ips"][BAD] == {"ip_restricted": 1}
        assert by_org[org]["last_redemption"] is not None and by_org[org]["apps"] == [CLIENT_ID]
    assert metric_value(sc.metrics(), "egress_sidecar_orgs") == 2

    # After a stop: the same export from the state directory alone, and nothing secret anywhere.
    outputs = [audit_cli(sc).stdout, audit_cli(sc, "--format", "json").stdout, audit_cli(sc, "--summary").stdout]
    assert sc.stop() == 0
    assert audit_cli(sc).stdout == outputs[0]
    written = {f"output {i}": o.encode() for i, o in enumerate(outputs)}
    for path in iter_written_files(sc.confdir):
        if path.name.startswith(AUDIT_FILE):
            written[path.name] = path.read_bytes()
    assert AUDIT_FILE in written
    for name, data in written.items():
        for secret in app.secrets:
            assert secret.encode() not in data and secret[:12].encode() not in data, f"{name} holds a secret"
        if not name.startswith("output"):  # the file names no customer: org ids, users and hosts are sealed
            for org in (org_a, org_b):
                assert org.encode() not in data and sf.user_of(org).encode() not in data, name
            assert b"login.salesforce.com" not in data


def test_audit_without_a_trail_says_so_and_a_bad_argument_is_exit_2(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc(world.pair_env(), start=False)
    missing = audit_cli(sc, ok=False)
    assert missing.returncode == 1 and "no audit trail" in missing.stderr and not missing.stdout
    bad = audit_cli(sc, "--org", "not-an-org", ok=False)
    assert bad.returncode == 2 and "not a Salesforce org id" in bad.stderr
    off = make_sidecar_proc({**world.pair_env(), "SIDECAR_AUDIT_RETENTION": "0"})
    with off.session() as s:
        assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200
    assert off.stop() == 0
    assert not (off.confdir / AUDIT_FILE).exists()
    assert [e["org"] for e in off.log_events()] == [world.salesforce.org_id]  # the log line still carries it


def test_two_replicas_on_redis_file_one_chain_under_one_grant_and_export_with_the_shared_key(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], redis_server: Callable[[], RedisServer]
) -> None:
    """An app with two replicas sharing Redis: a chain rotated on one and redeemed on the other is one grant in
    both replicas' trails (the grant id is keyed with the key the replicas share), and each replica's export
    opens its names with SIDECAR_REDIS_KEY (grants.key plays no part)."""
    sf = world.salesforce
    sf.set_allowlist([GOOD, BAD])
    org = sf.add_org()
    env = {**world.pair_env(), "SIDECAR_REDIS_URL": redis_server().url, "SIDECAR_REDIS_KEY": REDIS_KEY}
    one, two = make_sidecar_proc(env, name="one"), make_sidecar_proc(env, name="two")
    token = sf.issue_refresh_token(org)
    for sc in (one, two, one, two):
        with sc.session() as s:
            resp = redeem(s, token)
        assert resp.status_code == 200, resp.text
        token = resp.json()["refresh_token"]
    rows = []
    for sc in (one, two):
        assert wait_until(lambda sc=sc: (sc.confdir / AUDIT_FILE).exists() and count_calls(sc.confdir / AUDIT_FILE) == 2)
        rows += audit_csv(sc)
    assert len(rows) == 4 and {r["org_id"] for r in rows} == {org} and {r["user_id"] for r in rows} == {sf.user_of(org)}
    assert len({r["grant"] for r in rows}) == 1, [r["grant"] for r in rows]
    assert not (one.confdir / "grants.key").exists()  # (with Redis, the shared key seals and hashes)
    blind = subprocess.run([sys.executable, "-m", "sidecar", "audit", "--confdir", str(one.confdir)],
                           env={k: v for k, v in one.env.items() if k != "SIDECAR_REDIS_KEY" and k != "SIDECAR_REDIS_URL"},
                           capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    assert "(sealed under another key)" in blind.stdout and "key not found" in blind.stderr
    assert org not in blind.stdout
