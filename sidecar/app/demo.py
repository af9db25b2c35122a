"""``egress-sidecar demo``: the problem and the fix on one machine, with no credentials.

Starts, on loopback and inside this process, a simulated QuotaGuard pair (127.0.0.2 and 127.0.0.3,
each leaving from its own address), a simulated Salesforce whose Refresh Token IP Allowlist holds
only 127.0.0.2, and the real sidecar in front of them. A real HTTP client then redeems refresh tokens
through the sidecar, first with the guard observing (about half fail with "ip restricted by app
developer", exactly the calls through the other IP), then enforcing with the allowlist configured (all
succeed), then enforcing with no allowlist at all: the guard learns it from Salesforce's first refusal,
sends that one call again through the other IP, and the app sees no failure. Last, an ISV's case: two
customer orgs of one app whose allowlist holds both IPs, where org B's own Login IP Ranges refuse
127.0.0.3 with the very same "ip restricted" answer: the guard keeps only org B off that IP, says the
fix is on the customer's side, and org A keeps using both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from sidecar.app.service import Sidecar
from sidecar.config import load_settings
from sidecar.logs import setup_logging
from sidecar.sim.certs import TestCA
from sidecar.sim.echo import FakeIPEcho
from sidecar.sim.quotaguard import FakeQuotaGuardPair
from sidecar.sim.salesforce import FakeSalesforce

SF_HOST = "login.salesforce.com"
ECHO_HOST = "ip.quotaguard.com"
ALLOWLISTED = "127.0.0.2"
CLIENT_ID, CLIENT_SECRET = "3MVG9demo", "demo-consumer-secret"


class BackgroundSidecar:
    """A Sidecar on its own event loop in a thread (the demo's client runs in the main thread)."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="sidecar", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self.sidecar.run())
        except BaseException as exc:  # surfaced by start()
            self.error = exc

    def start(self, timeout: float = 20.0) -> BackgroundSidecar:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.sidecar.wait_listening(0.1):
            if self.error is not None or not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the sidecar did not start: {self.error!r}")
        return self

    def stop(self) -> None:
        self.sidecar.shutdown()
        self._thread.join(timeout=15)

    def __enter__(self) -> BackgroundSidecar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class OrgTally:
    """One customer org's redemptions in the ISV phase, as Salesforce saw them."""

    name: str
    org_id: str
    by_egress: Counter[tuple[str, int | None]] = field(default_factory=Counter)  # (source IP, status)
    app_failures: int = 0


@dataclass
class Phase:
    guard: str
    allowlist: str | None = ALLOWLISTED  # SIDECAR_ALLOWLIST, None: not configured
    orgs: list[OrgTally] = field(default_factory=list)  # the ISV phase: per customer org
    by_egress: dict[str, Counter[str]] = field(default_factory=dict)
    verdict: list[str] = field(default_factory=list)
    admin_url: str = ""
    calls: int = 0
    app_failures: int = 0  # refreshes whose answer the app saw fail
    retries: int = 0  # refused redemptions sent again through another egress IP

    @property
    def total(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for c in self.by_egress.values():
            out.update(c)
        return out


@dataclass
class World:
    salesforce: FakeSalesforce
    echo: FakeIPEcho
    pair: FakeQuotaGuardPair
    ca_bundle_for_upstream: Path

    def stop(self) -> None:
        self.pair.stop()
        self.echo.stop()
        self.salesforce.stop()


def start_world(workdir: Path) -> World:
    ca = TestCA(workdir / "simulated-salesforce-ca")
    cert, key = ca.issue([SF_HOST], "salesforce")
    sf = FakeSalesforce(cert, key, allowlist=(ALLOWLISTED,), client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    echo = FakeIPEcho()
    pair = FakeQuotaGuardPair(("127.0.0.2", "127.0.0.3"), username="demo", password="demo-proxy-password")
    sf.start()
    try:
        echo.start()
        pair.set_route((SF_HOST, 443), sf.address)
        pair.set_route((ECHO_HOST, 80), echo.address)
        pair.start()
    except BaseException:
        echo.stop()
        sf.stop()
        raise
    return World(sf, echo, pair, ca.ca_path)


def run_phase(world: World, workdir: Path, guard: str, calls: int, allowlist: str | None = ALLOWLISTED,
              orgs: list[OrgTally] | None = None) -> Phase:
    """One phase with its own sidecar. ``orgs``: redeem one grant of each of these customer orgs, in turn
    (the first twice as often), instead of one grant of the default org."""
    members = [f"{m.address[0]}:{m.address[1]}" for m in world.pair.members]
    phase = Phase(guard, allowlist, orgs=orgs or [], calls=calls)
    env = {
        "QUOTAGUARDSTATIC_URL": f"http://demo:demo-proxy-password@{members[0]}",
        "SIDECAR_PAIR": ",".join(members),
        "SIDECAR_LISTEN": "127.0.0.1:0",
        "SIDECAR_ADMIN_LISTEN": "127.0.0.1:0",
        # Each phase starts knowing nothing: its own confdir (the CA, and what Salesforce answered).
        "SIDECAR_CONFDIR": str(workdir / f"confdir-{guard}-{'allowlist' if allowlist else 'learn'}"
                               f"{'-orgs' if orgs else ''}"),
        "SIDECAR_UPSTREAM_CA": str(world.ca_bundle_for_upstream),
        "SIDECAR_ECHO_URL": f"http://{ECHO_HOST}/",
        "SIDECAR_GUARD": guard,
    }
    if allowlist:
        env["SIDECAR_ALLOWLIST"] = allowlist
    settings = load_settings(env)
    with BackgroundSidecar(Sidecar(settings)) as bg:
        sc = bg.sidecar
        deadline = time.monotonic() + 15
        while sc.prober.rounds == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sc.admin is not None
        phase.admin_url = "http://{}:{}".format(*sc.admin.address)
        # A plain HTTPS client configured the way HTTPS_PROXY + a CA bundle configure an app.
        client = urllib.request.build_opener(
            urllib.request.ProxyHandler({"https": sc.proxy_url}),
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=sc.confdir / "ca-bundle.pem")),
        )
        tally = phase.orgs or [OrgTally("", world.salesforce.org_id)]
        tokens = [world.salesforce.issue_refresh_token(t.org_id) for t in tally]
        world.salesforce.reset_seen()
        for i in range(calls):
            n = 0 if len(tally) == 1 or i % 3 != 1 else 1  # (the first org twice as often: it meets both IPs)
            form = {"grant_type": "refresh_token", "refresh_token": tokens[n],
                    "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
            try:
                with client.open(f"https://{SF_HOST}/services/oauth2/token",
                                 urllib.parse.urlencode(form).encode(), timeout=15) as resp:
                    tokens[n] = json.loads(resp.read())["refresh_token"]  # rotation: persist the new one first
            except urllib.error.HTTPError as exc:
                phase.app_failures += 1
                tally[n].app_failures += 1
                exc.close()
        for t in phase.orgs:
            t.by_egress = Counter((r.source_ip, r.status) for r in world.salesforce.seen if r.org_id == t.org_id)
        deadline = time.monotonic() + 5  # each call is recorded just after its answer went out
        while sum(sum(c.values()) for c in sc.recorder.snapshot()["outcomes_by_egress_ip"].values()) < calls:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        snapshot = sc.recorder.snapshot()["outcomes_by_egress_ip"]
        phase.by_egress = {ip: Counter(c) for ip, c in snapshot.items()}
        phase.verdict = sc.status()["verdict"]["lines"]
        phase.retries = int(sum(s.value for m in sc.metrics.ip_restricted_retries.collect() for s in m.samples
                                if s.name.endswith("_total")))
    return phase


def report(phases: list[Phase], members: list[str], out: TextIO, log_path: Path) -> None:
    w = out.write
    w("\negress-sidecar demo: everything ran on this machine (loopback), no credentials needed.\n\n")
    w(f"Simulated QuotaGuard pair: {members[0]} leaves from 127.0.0.2, {members[1]} from 127.0.0.3.\n")
    w(f"Simulated Salesforce: Refresh Token IP Allowlist = {ALLOWLISTED} only (the classic mistake).\n")
    titles = {
        ("observe", True): "guard OBSERVES: routed as QuotaGuard's balancer would (what your app sees today)",
        ("enforce", True): f"guard ENFORCES with SIDECAR_ALLOWLIST={ALLOWLISTED}: redemptions leave only from it",
        ("enforce", False): "guard ENFORCES with NO SIDECAR_ALLOWLIST: it learns the allowlist from Salesforce",
    }
    isv = ("guard ENFORCES for an ISV: two customer orgs of one app whose allowlist now holds BOTH IPs, and org B's "
           "own Login IP Ranges refuse 127.0.0.3 (Salesforce answers \"ip restricted\" all the same)")
    for i, p in enumerate(phases, 1):
        t = p.total
        w(f"\nPhase {i}: {isv if p.orgs else titles[(p.guard, p.allowlist is not None)]}\n")
        w(f"  {p.calls} refresh token redemptions: {p.calls - p.app_failures} succeeded, the app saw "
          f"{p.app_failures} fail")
        if p.retries:
            why = "for org B's own restriction" if p.orgs else "through the missing IP"
            w(f" (Salesforce refused {t.get('ip_restricted', 0)} {why}; the sidecar sent "
              f"{'that call' if p.retries == 1 else 'those calls'} again through the other IP)")
        w("\n")
        for ip, counts in sorted(p.by_egress.items()):
            parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            w(f"    egress IP {ip:<10} {parts}\n")
        for org in p.orgs:
            seen = ", ".join(f"{n} {'succeeded' if status == 200 else 'refused'} through {ip}"
                             for (ip, status), n in sorted(org.by_egress.items()))
            w(f"    org {org.name} ({org.org_id}): {seen}; the app saw {org.app_failures} fail\n")
        w("  verdict: " + " ".join(p.verdict) + "\n")
    w("\nThe failures were never random: every one left through 127.0.0.3, the IP missing from the allowlist.\n")
    if any(p.orgs for p in phases):
        w("An ISV's refusals need a second look: one org's own restriction looks exactly like a missing allowlist\n")
        w("entry. The sidecar keeps Salesforce's answers per org, keeps only that org off the IP, and names the org\n")
        w("whose admin must allow it; an IP is refused for the whole app only when two orgs agree.\n")
    w("Fix: add both QuotaGuard IPs to the allowlist (run `egress-sidecar check` to verify), and keep the\n")
    w("guard enforcing (the default with a pair) so a gap never reaches your app: it follows Salesforce's\n")
    w("answers, with or without SIDECAR_ALLOWLIST.\n\n")
    w("Where to look on a running sidecar (admin port, default :9464):\n")
    w("  /metrics  egress_sidecar_token_requests_total{egress_ip,outcome} splits outcomes per static IP\n")
    w("  /status   the pair, each egress IP's allowlist state and the verdict (JSON); / is the status page\n")
    w(f"The sidecar's own log lines of this demo: {log_path}\n")


def run_demo(calls: int = 20, out: TextIO | None = None, workdir: Path | None = None) -> list[Phase]:
    import sys

    stream = out or sys.stdout
    base = workdir or Path(tempfile.mkdtemp(prefix="egress-sidecar-demo-"))
    log_path = base / "sidecar.log"
    log_file = open(log_path, "a")  # noqa: SIM115 - closed below
    try:
        setup_logging("json", logging.INFO, stream=log_file)
        world = start_world(base)
        try:
            members = [f"{m.address[0]}:{m.address[1]}" for m in world.pair.members]
            phases = [run_phase(world, base, "observe", calls), run_phase(world, base, "enforce", calls),
                      run_phase(world, base, "enforce", calls, allowlist=None)]
            world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])  # the ISV phase: the app allows both IPs
            orgs = [OrgTally("B", world.salesforce.add_org(ip_ranges=[ALLOWLISTED])),
                    OrgTally("A", world.salesforce.add_org())]
            phases.append(run_phase(world, base, "enforce", calls, allowlist=None, orgs=orgs))
        finally:
            world.stop()
        report(phases, members, stream, log_path)
        return phases
    finally:
        log_file.close()
