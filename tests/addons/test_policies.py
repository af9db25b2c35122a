"""Each policy addon on its own, as mitmproxy's addons are tested: a flow, the hook, what it decided.
Plain code (no proxy, no sockets); the end-to-end tests run them inside the real sidecar."""

from __future__ import annotations

import asyncio
import json
import logging

import h11
import pytest

from addons.audit import Audit
from addons.client_access import ClientAccess
from addons.evidence import Evidence as EvidenceAddon
from addons.grants import Grants
from addons.guard import Guard as GuardAddon
from addons.record import Record
from addons.shield import RotationShield
from sidecar.egress.allowlist import parse_allowlist
from sidecar.egress.evidence import Evidence
from sidecar.egress.guard import Guard
from sidecar.metrics import Metrics
from sidecar.ops.orgs import OrgsSeen
from sidecar.ops.record import Recorder
from sidecar.proxy.access import Access
from sidecar.state.grants import GrantTracker
from sidecar.token.call import Identity, TokenCall
from sidecar.token.flow import Hooks, TokenFlow
from sidecar.token.messages import Answer, TokenRequest
from sidecar.token.shield import Shield
from tests.egress.pairs import make_pair
from tests.harness import metric_value

KEY = bytes(range(32))
FORM = b"grant_type=refresh_token&refresh_token=5Aep861rt&client_id=3MVG9app&client_secret=s3cret"


def flow(body: bytes = FORM, grant: str = "refresh_token") -> TokenFlow:
    req = TokenRequest("login.salesforce.com", 443, "POST", b"/services/oauth2/token",
                       [(b"Content-Type", b"application/x-www-form-urlencoded")], body=body)
    f = TokenFlow(TokenCall(started=0.0, host_class="login", grant_type=grant), request=req)
    f.fields = req.fields()
    return f


def facts() -> Evidence:
    ev = Evidence(Metrics(), 900.0, parse_allowlist(None))
    ev.open(KEY)
    return ev


ORG, USER = "00D5e000000AbCdEAA", "0055e000001XyZwAAC"
ANSWER = json.dumps({"refresh_token": "5Aep861new", "id": f"https://login.salesforce.com/id/{ORG}/{USER}"}).encode()


def tracked() -> GrantTracker:
    grants = GrantTracker(Metrics())
    grants.open(KEY, background=False)
    return grants


def test_evidence_names_the_app_and_the_org_and_learns_what_salesforce_said_through_each_ip() -> None:
    ev, grants = facts(), tracked()
    addon, f = EvidenceAddon(ev, grants), flow()
    asyncio.run(addon.request(f))
    assert f.app is not None and f.call.app == "3MVG9app"
    assert f.org is not None and not f.org.known and f.org.key == grants.token_key("5Aep861rt")  # its own key
    pair = make_pair("52.0.0.1", "52.0.0.2")
    f.call.outcome, f.egress_ip = "ip_restricted", "52.0.0.1"  # (the core sets the IP the attempt left from)
    addon.upstream_answer(f, pair.members[0])
    unknown = f.org
    f.call.outcome, f.answer, f.egress_ip = "success", Answer(200, [], ANSWER), "52.0.0.2"  # the retry's answer names the org
    addon.upstream_answer(f, pair.members[1])
    assert f.org.known and (f.org.id, f.org.user) == (ORG, USER)
    assert ev.said(f.app, f.org, "52.0.0.1").kind == "refused"  # the grant's refusal is now the org's  # type: ignore[union-attr]
    assert ev.said(f.app, f.org, "52.0.0.2").kind == "allowed"  # type: ignore[union-attr]
    assert not [x for x in ev.findings() if unknown.label in x.orgs]
    other = flow(grant="jwt_bearer")  # a grant the allowlist does not apply to teaches nothing
    asyncio.run(addon.request(other))
    other.call.outcome, other.egress_ip = "success", "52.0.0.1"
    addon.upstream_answer(other, pair.members[0])
    assert ev.said(f.app, f.org, "52.0.0.1").kind == "refused"  # type: ignore[union-attr]
    # The next redemption of the grant (its rotated token) is known as the org's before it is sent.
    f.call.outcome = "success"
    Grants(grants).done(f)
    again = flow(FORM.replace(b"5Aep861rt", b"5Aep861new"))
    asyncio.run(addon.request(again))
    assert again.org == f.org


def test_the_guard_routes_by_org_blocks_and_retries_only_an_ip_restricted_refusal() -> None:
    ev = facts()
    pair = make_pair("52.0.0.1", "52.0.0.2")
    rules = Guard(pair, parse_allowlist(None), "enforce", ev)
    guard, f = GuardAddon(rules, retry_ip_restricted=True), flow()
    asyncio.run(EvidenceAddon(ev, tracked()).request(f))
    guard.request(f)
    assert f.answer is None and f.member in pair.members and f.call.guard == "allow"
    f.call.outcome = "invalid_grant"  # a refusal that is not about the IP: never sent again
    assert guard.retry(f, pair.members[0], []) is None
    f.call.outcome = "ip_restricted"
    ev.record(f.app, f.org, "52.0.0.1", "refused")
    assert guard.retry(f, pair.members[0], []) is pair.members[1]
    assert GuardAddon(rules, retry_ip_restricted=False).retry(f, pair.members[0], []) is None
    ev.record(f.app, f.org, "52.0.0.2", "refused")  # both refused for this grant: blocked, nothing sent
    blocked = flow()
    asyncio.run(EvidenceAddon(ev, tracked()).request(blocked))
    guard.request(blocked)
    assert blocked.answer is not None and blocked.answer.status == 503
    assert (blocked.call.outcome, blocked.call.route, blocked.call.local) == ("blocked", "blocked", True)
    assert json.loads(blocked.answer.body)["sent_to_salesforce"] is False


def test_the_shield_lets_one_redemption_through_and_gives_its_answer_to_the_others() -> None:
    async def run() -> tuple[list[str | None], int]:
        shield = Shield(Metrics(), 60.0, 5.0)
        shield.hash_key = KEY
        addon = RotationShield(shield)
        hooks = Hooks([addon])
        flows = [flow() for _ in range(3)]
        await hooks.request(flows[0])
        assert flows[0].answer is None and "shield" in flows[0].metadata  # it leads
        waiting = [asyncio.create_task(hooks.request(f)) for f in flows[1:]]
        await asyncio.sleep(0.01)
        assert not any(t.done() for t in waiting)
        flows[0].answer = Answer(200, [], b'{"refresh_token":"5Aep861new"}')
        await hooks.response(flows[0])
        await asyncio.gather(*waiting)
        again = flow()  # within the replay window: answered again, not sent
        await hooks.request(again)
        return [f.call.shielded for f in [*flows, again]], sum(f.answer is not None for f in flows)

    shielded, answered = asyncio.run(run())
    assert shielded == [None, "coalesced", "coalesced", "replayed"] and answered == 3


def test_a_cancelled_leader_releases_its_waiters() -> None:
    async def run() -> BaseException | None:
        shield = Shield(Metrics(), 60.0, 5.0)
        shield.hash_key = KEY
        hooks = Hooks([RotationShield(shield)])
        leader, waiter = flow(), flow()
        await hooks.request(leader)
        task = asyncio.create_task(hooks.request(waiter))
        await asyncio.sleep(0.01)
        hooks.error(leader)
        try:
            await task
        except ConnectionError as exc:
            return exc
        return None

    assert isinstance(asyncio.run(run()), ConnectionError)


def test_the_record_writes_one_line_and_its_metrics(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    f = flow()
    call = f.call
    call.route, call.member, call.egress_ip, call.outcome, call.status, call.duration = \
        "pair", "127.0.0.2:9293", "52.0.0.1", "success", 200, 0.01
    call.failovers, call.retry_outcome = 1, "success"
    with caplog.at_level(logging.INFO, logger="egress_sidecar.token"):
        Record(Recorder(metrics), metrics).done(f)
    assert len([r for r in caplog.records if r.name == "egress_sidecar.token"]) == 1
    text = metrics.render().decode()
    assert metric_value(text, "egress_sidecar_token_requests_total", grant_type="refresh_token",
                        member="127.0.0.2:9293", egress_ip="52.0.0.1", outcome="success") == 1
    assert metric_value(text, "egress_sidecar_failovers_total") == 1
    assert metric_value(text, "egress_sidecar_ip_restricted_retries_total", outcome="success") == 1


def test_grants_hands_every_finished_call_to_the_tracker() -> None:
    seen: list[tuple[TokenCall, TokenRequest | None, Answer | None]] = []

    class Tracker(GrantTracker):
        def on_call(self, call: TokenCall, req: TokenRequest | None, answer: Answer | None) -> None:
            seen.append((call, req, answer))

    f = flow()
    f.answer = Answer(200, [], b"{}")
    Grants(Tracker(Metrics())).done(f)
    assert seen == [(f.call, f.request, f.answer)]


class Queue:
    """Stands in for the audit store's queue: what the addon hands over."""

    def __init__(self) -> None:
        self.entries: list[object] = []

        self.lost_because: list[str] = []

    def submit(self, entry: object) -> bool:
        self.entries.append(entry)
        return True

    def lost(self, why: str) -> None:
        self.lost_because.append(why)


def redemption(token: str, issued: str | None, *, org: str | None = None, status: int = 200) -> TokenFlow:
    f = flow(f"grant_type=refresh_token&refresh_token={token}&client_id=3MVG9app&client_secret=s3cret".encode())
    body = {"refresh_token": issued, "id": f"https://login.salesforce.com/id/{org or ORG}/{USER}"} if issued else \
        {"error": "invalid_grant", "error_description": "ip restricted"}
    f.answer = Answer(status, [], json.dumps(body).encode())
    f.call.outcome, f.call.status, f.call.egress_ip = ("success" if status == 200 else "ip_restricted"), status, "52.0.0.1"
    f.call.app = "3MVG9app"
    return f


def test_the_audit_names_the_org_and_the_grant_as_the_tracker_files_it_even_when_it_lags() -> None:
    """The next redemption may finish before the tracker has taken in the rotation (with Redis its observations
    wait in a queue): the audit still files it under the same grant, and the grant id is the tracker's."""
    grants, queue, orgs = tracked(), Queue(), OrgsSeen(Metrics())
    audit = Audit(queue, grants, orgs)  # type: ignore[arg-type]
    ev = facts()
    first = redemption("rt0", "rt1")
    audit.done(first)
    second = redemption("rt1", "rt2")
    second.org = ev.org(Identity(ORG, USER))
    audit.done(second)  # the tracker has seen neither call yet
    refused = redemption("rt2", None, status=400)
    refused.org = second.org
    audit.done(refused)
    assert first.call.grant == second.call.grant == refused.call.grant == grants.token_key("rt0").hex()[:12]
    Grants(grants).done(first)
    Grants(grants).done(second)
    (g,) = grants.snapshot()[0]
    assert g.grant_id == first.call.grant and g.org == ORG  # the id egress-sidecar grants shows
    code = flow(b"grant_type=authorization_code&code=aPrx1&client_id=3MVG9app&client_secret=s3cret",
                grant="authorization_code")
    code.answer, code.call.outcome, code.call.status = Answer(200, [], ANSWER), "success", 200
    audit.done(code)
    assert code.call.grant == grants.token_key("5Aep861new").hex()[:12] != first.call.grant  # a new grant
    # The log line carries the org, the user and the grant (the record addon writes it next).
    assert second.call.log_fields()["org"] == ORG and second.call.log_fields()["grant"] == first.call.grant
    assert "org" not in first.call.log_fields()  # (its org was not known when it was routed)
    # What the store gets: identifiers, never a token, a secret or a code.
    text = repr(queue.entries)
    assert len(queue.entries) == 4 and "3MVG9app" in text and ORG in text
    for secret in ("rt0", "rt1", "rt2", "s3cret", "aPrx1", "5Aep861new"):
        assert f"'{secret}'" not in text and secret not in text.replace("3MVG9app", ""), secret
    (row,) = orgs.snapshot().values()
    assert row.calls == 2 and row.refusals == 1 and row.by_ip == {"52.0.0.1": {"success": 1, "ip_restricted": 1}}


def test_a_record_the_audit_cannot_make_is_counted_not_silent() -> None:
    class Broken(GrantTracker):
        def token_key(self, token: str) -> bytes | None:
            raise RuntimeError("a bug")

    queue = Queue()
    Audit(queue, Broken(Metrics())).done(redemption("rt0", "rt1"))  # type: ignore[arg-type]
    assert queue.entries == [] and queue.lost_because == ["the audit addon failed (RuntimeError)"]


def test_client_access_refuses_strangers_and_asks_for_credentials(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:  # (the front door calls it on its event loop: the refusal log is throttled there)
        metrics = Metrics()
        local = ClientAccess(Access(None, max_connections=1), metrics)
        assert local.client_connected("127.0.0.1") and not local.client_connected("192.0.2.7")
        for _ in range(50):  # a flood of strangers: one line now, one for the rest at close, none lost
            local.client_connected("192.0.2.8")
        head = h11.Request(method="CONNECT", target="login.salesforce.com:443", headers=[("Host", "x")])
        assert local.request_head(head) is None
        local.active = 2  # over SIDECAR_MAX_CONNECTIONS
        refusal = local.request_head(head)
        assert refusal is not None and refusal[0].status_code == 503  # type: ignore[union-attr]
        local.close()
        text = metrics.render().decode()
        assert metric_value(text, "egress_sidecar_connections_refused_total", reason="not_loopback") == 51
        assert metric_value(text, "egress_sidecar_connections_refused_total", reason="max_connections") == 1
        lines = [r.getMessage() for r in caplog.records if "from another host" in r.getMessage()]
        assert [line.split(" client")[0] for line in lines] == ["refused 1", "refused 50"], lines
        assert "the last from 192.0.2.8" in lines[1] and "SIDECAR_PROXY_AUTH" in lines[1]
        shared = ClientAccess(Access("app:pw"))
        assert shared.client_connected("192.0.2.7")
        refusal = shared.request_head(head)
        assert refusal is not None and refusal[0].status_code == 407  # type: ignore[union-attr]

    asyncio.run(run())


def test_hooks_run_in_the_addons_order_and_an_answer_stops_the_request_hooks() -> None:
    order: list[str] = []

    class First:
        def request(self, f: TokenFlow) -> None:
            order.append("first")
            f.answer = Answer(503, [], b"")

        def done(self, f: TokenFlow) -> None:
            order.append("first.done")

    class Second:
        async def request(self, f: TokenFlow) -> None:
            order.append("second")

        def done(self, f: TokenFlow) -> None:
            raise RuntimeError("a broken addon")  # logged; the next one still runs

    class Third:
        def done(self, f: TokenFlow) -> None:
            order.append("third.done")

    hooks = Hooks([First(), Second(), Third()])
    f = flow()
    asyncio.run(hooks.request(f))
    hooks.done(f)
    assert order == ["first", "first.done", "third.done"]
