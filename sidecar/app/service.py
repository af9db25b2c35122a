"""The running sidecar: wires the engine (front door, lane, forwarder, token core), the policy addons,
the admin server and the egress prober, and owns their lifecycle. The CLI only parses arguments and
calls into this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from addons.audit import Audit
from addons.client_access import ClientAccess
from addons.evidence import Evidence as EvidenceAddon
from addons.grants import Grants
from addons.guard import Guard as GuardAddon
from addons.record import Record
from addons.shield import RotationShield
from sidecar import __version__
from sidecar.config import ConfigError, HostPort, Settings, decode_key
from sidecar.egress.discovery import Prober
from sidecar.egress.evidence import Evidence
from sidecar.egress.guard import Guard
from sidecar.egress.pair import Member, Pair, build_pair
from sidecar.egress.verify import Verifier
from sidecar.logs import SCRUBBER, event
from sidecar.metrics import Metrics
from sidecar.net.resolver import CLIENT_LOOKUPS, TOKEN_LOOKUPS, Resolver
from sidecar.net.upstream import ConnectFailure, Connector, UpstreamPool
from sidecar.ops.admin import AdminServer
from sidecar.ops.orgs import OrgsSeen, org_table
from sidecar.ops.record import Recorder
from sidecar.ops.status import build_status, render_page
from sidecar.ops.trust import (
    client_env,
    ensure_ca,
    export_ca,
    install_given_ca,
    prepare_confdir,
    prepare_dir,
    shell_assignments,
    trust_context,
    upstream_trust,
)
from sidecar.proxy.access import Access
from sidecar.proxy.destinations import Destinations
from sidecar.proxy.forward import Forwarder
from sidecar.proxy.frontdoor import HEAD_TIMEOUT, FrontDoor
from sidecar.proxy.lane import Lane
from sidecar.proxy.leafcerts import CertStore, LeafContexts, open_certstore
from sidecar.proxy.route import Routes
from sidecar.state.audit import AUDIT_FILE, AuditStore
from sidecar.state.grants import GrantTracker
from sidecar.state.redis import SharedState
from sidecar.state.sqlite import DB_FILE, GrantStore, load_or_create_key
from sidecar.token.core import TokenCore
from sidecar.token.hosts import TokenHosts
from sidecar.token.sender import TokenSender
from sidecar.token.shield import Shield

log = logging.getLogger("egress_sidecar")
DRAIN_SECONDS = 10.0  # at most this long a stop waits for token calls in flight


def check_bindable(setting: str, hp: HostPort) -> None:
    """Fail at start with the setting's name when its address cannot be bound."""
    family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(hp.address)
        except OSError as exc:
            raise ConfigError(
                f"{setting}: cannot listen on {hp} ({exc.strerror or exc}). "
                "Pick a free port or stop what is using it."
            ) from None


class Sidecar:
    """One sidecar instance. ``run()`` serves until ``shutdown()``; safe to build in tests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.confdir = prepare_confdir(settings.confdir_path)
        self.metrics = Metrics()
        self.pair: Pair = build_pair(settings)
        self.evidence = Evidence(self.metrics, settings.evidence_ttl, settings.allowlist_ranges,
                                 app_orgs=settings.app_refusal_orgs)
        self.guard = Guard(self.pair, settings.allowlist_ranges, settings.guard_mode, self.evidence)
        self.recorder = Recorder(self.metrics)
        self.hosts = TokenHosts(settings.token_hosts)
        # Each new connection through a member has its egress IP asked on it (when the echo allows it).
        self.verifier = Verifier(self.pair, settings.echo_url, self.metrics)
        self.prober = Prober(self.pair, self.guard, self.metrics, settings, self.verifier)
        self.started = time.time()
        self.proxy_address: tuple[str, int] | None = None
        self.admin: AdminServer | None = None
        self._stopped: asyncio.Event | None = None
        self.certstore: CertStore | None = None
        self._listening = threading.Event()
        upstream = settings.upstream
        if upstream is not None:
            SCRUBBER.add(upstream.password.get_secret_value(), upstream.proxy_authorization.decode()[6:])
        if settings.proxy_auth is not None:
            SCRUBBER.add(settings.proxy_auth.get_secret_value().partition(":")[2])
        if settings.redis_url is not None and settings.redis_key is not None:
            SCRUBBER.add(urlsplit(settings.redis_url.get_secret_value()).password, settings.redis_key.get_secret_value())
        self.metrics.direct_mode.set(1 if self.pair.direct else 0)
        self.metrics.guard_enforcing.set(1 if self.guard.mode == "enforce" else 0)
        # Refresh token hygiene (rotation, reuse, idle grants): observes finished token calls.
        self.grants = GrantTracker(self.metrics, idle_policy=settings.idle_expiry)
        # The per-org view of /status (calls since start, grants per org) and the audit trail (opened in run()).
        self.orgs = OrgsSeen(self.metrics)
        self.grants.on_maintained = lambda: self.orgs.grant_orgs(frozenset(o for o in self.grants.org_summary if o))
        self.audit = Audit(None, self.grants, self.orgs)
        self.upstream_trust = upstream_trust(settings, self.confdir)
        # Name lookups: one resolver for the destinations clients ask for, another for direct token calls;
        # members are IP literals (sidecar.net.resolver).
        self.destinations = Destinations(shared_proxy=settings.proxy_auth is not None,
                                         allow_private=settings.allow_private_destinations,
                                         resolver=Resolver("client", CLIENT_LOOKUPS))
        self.connector = Connector(settings.upstream, trust_context(settings), self.destinations)
        self.pool = UpstreamPool(self.connector, settings.connect_timeout, self.verifier,
                                 token_resolver=Resolver("token", TOKEN_LOOKUPS))
        sender = TokenSender(self.pool, settings.response_timeout, self._member_failed, self._member_ok)
        self.access = ClientAccess(Access(settings.proxy_auth.get_secret_value() if settings.proxy_auth else None,
                                          settings.max_connections), self.metrics)
        self.frontdoor: FrontDoor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        # Shared with the app's other replicas (SIDECAR_REDIS_URL), or None: everything stays in this process.
        self.shared = SharedState(settings.redis_url.get_secret_value(), decode_key(
            settings.redis_key.get_secret_value()), self.metrics) if settings.redis_url and settings.redis_key else None
        self.shield = Shield(self.metrics, settings.replay_window, longest_redemption(settings, len(self.pair.members)),
                             self.shared)
        self.routes = Routes(self.guard, settings.route, settings.salesforce_tunnels)
        # The policies, in the order the core calls their hooks (sidecar/token/flow.py): the app and the org
        # are named before the shield and the guard look at the call; the audit names the call's org, user and grant
        # before the record writes its log line (which carries them), and both before the grants take the call in.
        self.addons = (
            EvidenceAddon(self.evidence, self.grants),
            RotationShield(self.shield),
            GuardAddon(self.guard, retry_ip_restricted=settings.retry_on_ip_restricted),
            self.audit,
            Record(self.recorder, self.metrics),
            Grants(self.grants),
        )
        self.core = TokenCore(self.hosts, sender, self.addons)
        self.core.books.on_early = self.metrics.records_applied_early.inc

    def _member_failed(self, member: Member, failure: ConnectFailure) -> None:
        self.metrics.member_failures.labels(member.label, failure.reason).inc()
        ejected_for = member.record_connect_failure() if failure.ejects else None
        event(log, logging.WARNING, f"pair member {member.label}: {failure.detail}", member=member.label,
              reason=failure.reason)
        if ejected_for is not None:
            event(log, logging.WARNING,
                  f"pair member {member.label} ejected for {ejected_for:g}s after "
                  f"{member.consecutive_failures} consecutive connect failures; a successful probe re-admits it",
                  member=member.label)

    def _audit_dropped(self, reason: str, n: int) -> None:
        self.metrics.audit_writes_dropped.labels(reason).inc(n)

    def _member_ok(self, member: Member) -> None:
        member.record_connect_success()

    # -- what the admin server reads ----------------------------------------------------------
    def metrics_text(self) -> bytes:
        self.settle_books()
        return self.metrics.render()

    def settle_books(self, timeout: float = 1.0) -> None:
        """Apply the records still waiting for their batch (a few ms at most) before the admin server reads the
        metrics or the status, so a scrape or a look right after a call sees it. Called from the admin server's
        threads: the batch is applied on the event loop, waited for at most ``timeout``."""
        loop = self._loop
        if loop is None or loop.is_closed() or not self.core.books:
            return
        try:
            if asyncio.get_running_loop() is loop:
                self.core.books.flush()
                return
        except RuntimeError:
            pass  # (no loop in this thread: the admin server's)
        done = threading.Event()

        def flush() -> None:
            try:
                self.core.books.flush()
            finally:
                done.set()

        with contextlib.suppress(RuntimeError):  # (the loop is closing)
            loop.call_soon_threadsafe(flush)
            done.wait(timeout)

    def is_serving(self) -> tuple[bool, str]:
        """Whether the proxy takes new clients: it listens and is not draining. Depends on nothing outside
        the process (the readiness probe of a platform: an upstream outage must not take the app out)."""
        if self._draining:
            return False, "draining: stopping after a signal, no new clients are accepted"
        if not self._listening.is_set():
            return False, "proxy not listening yet"
        return True, "ok"

    def is_ready(self) -> tuple[bool, str]:
        serving, why = self.is_serving()
        if not serving:
            return False, why
        if not self.guard.ready():
            return False, self.guard.explain_block()
        return True, "ok"

    def status(self, orgs_page: int = 1) -> dict[str, Any]:
        self.settle_books()
        return build_status(self, orgs_page)

    def org_rows(self, page: int, findings: list[Any]) -> dict[str, Any]:
        return org_table(self.orgs.snapshot(), self.grants.org_summary, findings, self.settings.idle_expiry, page)

    def status_facts(self) -> dict[str, Any]:
        upstream = self.settings.upstream
        last = self.metrics.tls_failure_last
        return {"upstream": upstream.redacted() if upstream else None, "route": self.settings.route,
                "probe_rounds": self.prober.rounds, "calls": self.recorder.snapshot(),
                "shield": {"replay_window_seconds": self.settings.replay_window,
                           "coalesced": _count(self.metrics.shield_answers, "coalesced"),
                           "replayed": _count(self.metrics.shield_answers, "replayed"),
                           "answers_kept": self.shield.cached,
                           "redis": self.shared.status() if self.shared is not None else {"configured": False}},
                "client_tls": {"failures": dict(self.metrics.tls_failures_seen),
                               "last_age_seconds": None if last is None else round(time.time() - last, 1)}}

    @property
    def trust_dir(self) -> Path:
        """Where the files apps need to trust the sidecar are written (ca.pem, ca-bundle.pem, truststore.p12):
        SIDECAR_TRUST_DIR, by default the confdir."""
        return self.settings.trust_dir_path

    def ca_path(self) -> Path | None:
        return self.trust_dir / "ca.pem"

    @property
    def proxy_url(self) -> str:
        host, port = self.proxy_address or self.settings.listen_address.address
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"http://{HostPort(host, port)}"

    # -- lifecycle ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything that can fail on configuration or a full disk, before anything listens: the CA (made
        here rather than by mitmproxy, whole or not at all) and the trust files apps read."""
        s = self.settings
        check_bindable("SIDECAR_LISTEN", s.listen_address)
        prepare_dir(self.trust_dir, "SIDECAR_TRUST_DIR", 0o755)  # public files only: apps read them
        if s.ca_cert is not None and s.ca_key is not None:
            install_given_ca(s.ca_cert.expanduser(), s.ca_key.expanduser(), self.confdir)
        ensure_ca(self.confdir)
        export_ca(self.confdir, self.trust_dir, setting="SIDECAR_TRUST_DIR" if s.trust_dir else "SIDECAR_CONFDIR")

    async def run(self) -> None:
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self.prepare()
        # grants.sqlite3: refresh token tracking and Salesforce's evidence per egress IP, as keyed hashes.
        # The key is grants.key, or, with Redis, one derived from SIDECAR_REDIS_KEY so replicas agree.
        if self.shared is not None:
            await self.shared.start()
        key = self.shared.hash_key if self.shared is not None else load_or_create_key(self.confdir)
        store = GrantStore(self.confdir / DB_FILE)
        self.grants.open(key, store)  # loads the grants, starts the writer thread
        self.evidence.open(key, store)
        if s.audit_retention_seconds > 0:  # the audit trail: one record per token call (SIDECAR_AUDIT_RETENTION)
            audit = AuditStore(self.confdir / AUDIT_FILE, key, retention=s.audit_retention_seconds,
                               max_rows=s.audit_max_rows, on_drop=self._audit_dropped)
            audit.open()
            audit.start()
            self.audit.store = audit
        self.shield.hash_key = key
        if self.shared is not None:
            self.grants.share(self.shared)
            self.evidence.share(self.shared)  # per org and app-wide, read before each call is routed
            await self.evidence.pull_all()
        admin = self.settings.admin_address
        try:
            self.admin = AdminServer(admin.host, admin.port, self, render_page)
        except OSError as exc:
            raise ConfigError(
                f"SIDECAR_ADMIN_LISTEN: cannot listen on {admin} ({exc.strerror or exc}). Pick a free port."
            ) from None
        self.certstore = open_certstore(self.confdir)  # the CA apps trust (made whole by prepare())
        self._stopped = asyncio.Event()
        self.admin.start()
        self._announce_mode()
        self.prober.update_metrics()
        probe_task = asyncio.create_task(self.prober.run(), name="egress-prober")
        try:
            try:
                address = await self.open_front_door()
            except OSError as exc:
                raise ConfigError(f"SIDECAR_LISTEN: cannot listen on {self.settings.listen} ({exc.strerror or exc}). "
                                  "Pick a free port or stop what is using it.") from None
            self.on_listening(address)
            await self._stopped.wait()
        finally:
            probe_task.cancel()
            await asyncio.gather(probe_task, return_exceptions=True)
            if self.frontdoor is not None:
                await self.frontdoor.stop()
            self.pool.close_all()
            self.admin.stop()
            self.core.books.flush()  # the last calls' records, before the stores below close
            await self.grants.stop_sharing()
            self.evidence.flush()  # the latest time of each answer, before the store closes
            await asyncio.to_thread(self.grants.close)  # writes what is queued (bounded)
            if self.audit.store is not None:
                await asyncio.to_thread(self.audit.store.close)
            if self.shared is not None:
                await self.shared.close()
            self._listening.clear()
            self.metrics.ready.set(0)

    def shutdown(self) -> None:
        """Thread-safe: stop accepting clients, let token calls in flight finish (bounded: a refresh that
        reached Salesforce has rotated the app's token, so its answer must reach the app), then stop.
        A second call stops at once."""
        loop, stopped = self._loop, self._stopped
        if loop is None or stopped is None:
            return
        if self._draining:
            loop.call_soon_threadsafe(stopped.set)
            return
        self._draining = True  # /serving and /readyz answer 503 from now on
        self.metrics.ready.set(0)
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_and_stop()))

    async def _drain_and_stop(self) -> None:
        assert self._stopped is not None
        if self.frontdoor is not None:
            self.frontdoor.close_listener()
        loop = asyncio.get_running_loop()
        started, waiting = loop.time(), self.core.in_flight
        deadline = started + min(self.settings.response_timeout, DRAIN_SECONDS)
        while self.core.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.02)
        left, clients = self.core.in_flight, self.access.active
        event(log, logging.WARNING if left else logging.INFO,
              f"stopping: {waiting - left} of {waiting} token call(s) in flight finished and were answered"
              + (f", {left} did not finish within {deadline - started:.0f}s (their apps get no answer; if one "
                 "was a refresh, its rotated token may be lost)" if left else "")
              + f"; closing {clients} client connection(s)",
              drained=waiting - left, abandoned=left, clients=clients,
              waited_seconds=round(loop.time() - started, 2))
        await asyncio.sleep(0.05)  # their answers go out (their records are applied as run() ends)
        self._stopped.set()

    async def open_front_door(self) -> tuple[str, int]:
        s = self.settings
        certstore = self.certstore
        lane = Lane(
            self.core, self.routes, Forwarder(self.pool, s.idle_timeout),
            LeafContexts(lambda: certstore, self.confdir, self.hosts.certificate_name), self.metrics,
            idle_timeout=s.idle_timeout, handshake_timeout=min(HEAD_TIMEOUT, s.idle_timeout),
        )
        self.frontdoor = FrontDoor(
            self.hosts, self.metrics, self.access, connect_timeout=s.connect_timeout, idle_timeout=s.idle_timeout,
            lane=lane, connector=self.connector, destinations=self.destinations,
        )
        listen = s.listen_address
        address = await self.frontdoor.start(listen.host, listen.port)
        self.destinations.listening(*address)
        if self.admin is not None:
            self.destinations.listening(*self.admin.address)
        return address

    def on_listening(self, address: tuple[str, int]) -> None:
        self.proxy_address = address
        self._listening.set()
        self.metrics.ready.set(1)
        env = client_env(self.trust_dir, self.proxy_url)
        event(
            log,
            logging.INFO,
            f"egress-sidecar {__version__} listening on {HostPort(*address)}; admin on "
            f"{HostPort(*self.admin.address) if self.admin else '?'}",
            proxy=self.proxy_url,
            admin=f"http://{HostPort(*self.admin.address)}" if self.admin else None,
        )
        event(
            log,
            logging.INFO,
            "app environment: " + shell_assignments(env),
        )

    def wait_listening(self, timeout: float) -> bool:
        return self._listening.wait(timeout)

    def _announce_mode(self) -> None:
        s = self.settings
        if self.pair.direct:
            event(
                log,
                logging.WARNING,
                "DIRECT MODE: QUOTAGUARDSTATIC_URL is not set, so token calls leave from this host's own "
                "(rotating) IP and no static IP is in use. Token calls are still detected, measured and logged.",
                mode="direct",
            )
        else:
            assert s.upstream is not None
            event(
                log,
                logging.INFO,
                f"pair: {', '.join(m.label for m in self.pair.members)} via {s.upstream.redacted()}; "
                f"route={s.route} guard={self.guard.mode}",
                members=[m.label for m in self.pair.members],
            )
            if len(self.pair.members) == 1:
                event(
                    log,
                    logging.WARNING,
                    "the QuotaGuard host resolves to a single address; both static IPs may still be used "
                    "behind it. Set SIDECAR_PAIR to the members if you know them.",
                )


def longest_redemption(settings: Settings, members: int) -> float:
    """The longest one token call can be in flight: the sender tries each member once while nothing is
    sent (a connect deadline each), then waits the response deadline; the retry of an "ip restricted"
    refusal is a second such send. The rotation shield's waiters wait this long, and its Redis lock lives
    this long: a lock that expired under a leader still in flight would let another replica redeem the
    same refresh token again."""
    one = max(1, members) * settings.connect_timeout + settings.response_timeout
    return one * (2 if settings.retry_on_ip_restricted else 1) + 1.0


def _count(counter: Any, label: str) -> int:
    """A labelled counter's value, from the registry's own samples."""
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and label in sample.labels.values():
                return int(sample.value)
    return 0
