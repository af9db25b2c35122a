"""Refresh token hygiene end to end: the real sidecar process in front of the simulated pair and a
fake Salesforce that rotates refresh tokens; real clients; the ``grants`` command as a user runs it."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import requests

from sidecar.state.sqlite import DB_FILE, KEY_FILE, count_rows, read_grants
from tests.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    PROXY_PASS,
    PROXY_USER,
    ROOT,
    TOKEN_URL,
    SidecarProcess,
    World,
    iter_written_files,
    metric_value,
    redeem,
    wait_until,
)

ROTATIONS = "egress_sidecar_refresh_token_rotations_total"
REUSE = "egress_sidecar_refresh_token_reuse_total"
TRACKED = "egress_sidecar_grants_tracked"
EXPIRED = {"error": "invalid_grant", "error_description": "expired access/refresh token"}


def grants_cli(sc: SidecarProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``egress-sidecar grants`` as an operator runs it: same environment as the sidecar."""
    out = subprocess.run([sys.executable, "-m", "sidecar", "grants", *args], env=sc.env, capture_output=True,
                         text=True, timeout=30, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    return out


def grants_json(sc: SidecarProcess) -> dict[str, Any]:
    return json.loads(grants_cli(sc, "--json").stdout)


def stored_rotations(sc: SidecarProcess) -> list[int]:
    path = sc.confdir / DB_FILE
    return sorted(g.rotations for g in read_grants(path)) if path.exists() else []


def persisting_chain(s: requests.Session, token: str, n: int) -> list[str]:
    """A correct client: saves the new refresh token of every response before the next refresh."""
    seen = [token]
    for _ in range(n):
        resp = redeem(s, token)
        assert resp.status_code == 200, resp.text
        token = resp.json()["refresh_token"]
        seen.append(token)
    return seen


def test_a_client_that_persists_each_new_token_shows_rotations_and_no_reuse(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc(world.pair_env())
    with sc.session() as s:
        persisting_chain(s, world.salesforce.issue_refresh_token(), 5)
    text = sc.metrics()
    assert metric_value(text, ROTATIONS, rotated="true") == 5
    assert metric_value(text, ROTATIONS, rotated="false") == 0
    assert metric_value(text, REUSE) == 0
    assert metric_value(text, TRACKED) == 1
    assert metric_value(text, "egress_sidecar_grants_idle", window="7d") == 0
    assert sc.log_events("refresh_token_reuse") == []
    assert wait_until(lambda: stored_rotations(sc) == [5])  # written off the request path
    report = grants_json(sc)
    assert report["tracked"] == 1
    (grant,) = report["grants"]
    assert (grant["rotations"], grant["reuses"], grant["state"]) == (5, 0, "ok")


def test_a_client_that_keeps_redeeming_its_first_token_shows_one_reuse_per_extra_attempt(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    # Replay off: within the window the rotation shield would answer these again with the rotated token.
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_REPLAY_WINDOW": "0"})
    first = world.salesforce.issue_refresh_token()
    with sc.session() as s:
        assert redeem(s, first).status_code == 200  # the new token in this answer is never saved
        for _ in range(3):
            resp = redeem(s, first)
            assert resp.status_code == 400 and resp.json() == EXPIRED  # forwarded: Salesforce answered
    text = sc.metrics()
    assert metric_value(text, REUSE) == 3
    assert metric_value(text, ROTATIONS, rotated="true") == 1
    assert [c["outcome"] for c in sc.log_events()] == ["success"] + ["invalid_grant"] * 3
    warnings = sc.log_events("refresh_token_reuse")
    assert len(warnings) == 3
    assert {w["level"] for w in warnings} == {"warning"}
    assert "did not persist the new token" in warnings[0]["msg"]
    assert "Salesforce answered 400 invalid_grant (expired access/refresh token)" in warnings[0]["msg"]
    assert "before anything else runs" in warnings[0]["msg"]
    assert wait_until(lambda: stored_rotations(sc) == [1])
    (grant,) = grants_json(sc)["grants"]
    assert {w["grant"] for w in warnings} == {grant["grant_id"]}
    assert wait_until(lambda: grants_json(sc)["grants"][0]["reuses"] == 3)


def test_retrying_after_ip_restricted_is_not_reuse(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    # Only 127.0.0.2 is allowlisted and the guard only observes: every other call is refused before
    # Salesforce looks at the token, so the app correctly retries the same token. That is not reuse.
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_GUARD": "observe"})
    token = world.salesforce.issue_refresh_token()
    outcomes = []
    with sc.session() as s:
        for _ in range(6):
            resp = redeem(s, token)
            outcomes.append(resp.status_code)
            if resp.ok:
                token = resp.json()["refresh_token"]
    assert outcomes == [200, 400] * 3
    text = sc.metrics()
    assert metric_value(text, REUSE) == 0
    assert metric_value(text, ROTATIONS, rotated="true") == 3
    assert metric_value(text, TRACKED) == 1


def test_grants_survive_a_sidecar_restart(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc(world.pair_env())
    with sc.session() as s:
        chain = persisting_chain(s, world.salesforce.issue_refresh_token(), 3)
    assert sc.stop() == 0  # SIGTERM: queued writes are flushed
    gid = grants_json(sc)["grants"][0]["grant_id"]
    sc.start()
    assert metric_value(sc.metrics(), TRACKED) == 1  # loaded at start, before any call
    with sc.session() as s:
        resp = redeem(s, chain[1])  # rotated away before the restart
        assert resp.status_code == 400 and resp.json() == EXPIRED
        persisting_chain(s, chain[-1], 1)
    text = sc.metrics()
    assert metric_value(text, REUSE) == 1
    assert [w["grant"] for w in sc.log_events("refresh_token_reuse")] == [gid]
    assert sc.stop() == 0
    report = grants_json(sc)
    assert report["tracked"] == 1
    (grant,) = report["grants"]
    assert (grant["grant_id"], grant["rotations"], grant["reuses"]) == (gid, 4, 1)


def test_concurrent_clients_keep_the_store_consistent(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc(world.pair_env())
    n_clients, per_client = 4, 5
    tokens = [world.salesforce.issue_refresh_token() for _ in range(n_clients)]
    errors: list[BaseException] = []
    start = threading.Barrier(n_clients)

    def client(token: str) -> None:
        try:
            with sc.session() as s:
                start.wait(timeout=10)
                persisting_chain(s, token, per_client)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    text = sc.metrics()
    assert metric_value(text, ROTATIONS, rotated="true") == n_clients * per_client
    assert metric_value(text, REUSE) == 0
    assert metric_value(text, TRACKED) == n_clients
    assert sc.stop() == 0
    assert count_rows(sc.confdir / DB_FILE) == (n_clients, n_clients * 2)
    report = grants_json(sc)
    assert [g["rotations"] for g in report["grants"]] == [per_client] * n_clients
    assert len({g["grant_id"] for g in report["grants"]}) == n_clients


def test_no_token_secret_or_password_is_written_anywhere(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """Every scenario above in one sidecar, then every file, log line, metric, status and command
    output it produced is searched for every secret the run used, and for its 12-character prefix."""
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_REPLAY_WINDOW": "0"})  # the lost token really is reused
    secrets: list[str] = [PROXY_PASS, CLIENT_SECRET, base64.b64encode(f"{PROXY_USER}:{PROXY_PASS}".encode()).decode()]

    def keep(resp: requests.Response) -> requests.Response:
        if resp.ok:
            body = resp.json()
            secrets.extend(v for k, v in body.items() if k in ("refresh_token", "signature"))
            # An access token is ORG_ID!SECRET: the org id before the "!" is an identifier the sidecar names on
            # /status and in logs on purpose (docs/failure-handling.md); what follows is the secret.
            secrets.append(body["access_token"].partition("!")[2])
        return resp

    with sc.session() as s:
        # A persisting client, a client that loses its new token, and the web server flow.
        token = world.salesforce.issue_refresh_token()
        secrets.append(token)
        for _ in range(3):
            token = keep(redeem(s, token)).json()["refresh_token"]
        first = world.salesforce.issue_refresh_token()
        secrets.append(first)
        keep(redeem(s, first))
        assert redeem(s, first).json() == EXPIRED
        code = world.salesforce.issue_auth_code()
        secrets.append(code)
        resp = keep(s.post(TOKEN_URL, data={"grant_type": "authorization_code", "code": code, "client_id": CLIENT_ID,
                                            "client_secret": CLIENT_SECRET,
                                            "redirect_uri": "https://app.example.com/oauth/callback"}, timeout=15))
        assert resp.status_code == 200, resp.text
        keep(redeem(s, resp.json()["refresh_token"]))
    assert metric_value(sc.metrics(), TRACKED) == 3
    assert sc.stop() == 0
    sc.start()
    with sc.session() as s:
        keep(redeem(s, token))
        assert redeem(s, first).status_code == 400
    outputs = [sc.metrics(), json.dumps(sc.status()), grants_cli(sc).stdout, grants_cli(sc, "--json").stdout]
    assert metric_value(outputs[0], REUSE) == 1
    assert sc.stop() == 0

    key_file = sc.confdir / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key_hex = key_file.read_text().strip()
    secrets.append(key_hex)
    assert count_rows(sc.confdir / DB_FILE)[0] == 3  # the scan below reads a real, populated store
    assert len(sc.log_events("refresh_token_reuse")) == 2 and len(sc.log_events()) == 9
    written: dict[str, bytes] = {f"output {i}": o.encode() for i, o in enumerate(outputs)}
    for path in iter_written_files(sc.confdir.parent):  # the confdir and the log
        if path != key_file:
            written[str(path.relative_to(sc.confdir.parent))] = path.read_bytes()
    assert any(name.startswith("confdir/grants.sqlite3") for name in written)
    assert "sidecar.log" in written
    probes = {p for secret in secrets for p in (secret, secret[:12])}
    probes.add(bytes.fromhex(key_hex)[:12].hex())
    org = world.salesforce.org_id  # not a secret, but the state names no customer: org ids are sealed there
    assert org in json.dumps(outputs[1])  # (/status names it: the operator needs it)
    for name, data in written.items():
        if name.startswith("confdir/"):
            assert org.encode() not in data and org[:15].encode() not in data, f"{name} names the customer org"
        for probe in probes:
            assert probe.encode() not in data, f"{name} contains a secret (prefix {probe[:4]}...)"
        assert bytes.fromhex(key_hex)[:12] not in data, f"{name} contains the grants key"
