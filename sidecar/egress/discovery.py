"""Egress discovery: learn which static IPs each pair member (an address of the proxy) leaves from, by
asking an IP echo.

Each probe round opens ``SIDECAR_PROBE_SAMPLES`` new connections through every member (QuotaGuard may
balance per connection) and asks ``SIDECAR_ECHO_URL`` twice on each (an ``http://`` echo: the two answers
of one connection must agree, which is what lets each token call's connection be verified on its own:
:mod:`sidecar.egress.verify`). A round whose samples agree sets the member's egress IP (and a different
one than before is an *egress change*: logged and counted); samples that disagree show an address that
leaves from several IPs (one load-balanced address in front of the pair), whose single egress is not
claimed: with per-connection verification each connection's own IP is judged, without it the member is
*unstable*. A member that answers no sample is down.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time

import h11

from sidecar.config import Settings, Upstream
from sidecar.egress.guard import Guard
from sidecar.egress.pair import Member, Pair
from sidecar.egress.verify import Verifier
from sidecar.logs import event
from sidecar.metrics import EGRESS_UNKNOWN, FAILURE_REASONS, PROBE_RESULTS, Metrics
from sidecar.net.echo import PROXY_407, EchoError, EchoTarget, parse_echo_body
from sidecar.net.http1 import HttpConnection
from sidecar.net.upstream import (
    ConnectFailure,
    Connector,
    SendFailure,
    ask_echo,
    describe_error,
)
from sidecar.ops.trust import trust_context
from sidecar.token.call import ALLOWLISTED_GRANTS

log = logging.getLogger("egress_sidecar.discovery")


ProbeError = EchoError  # a probe through a member failed (``member_down``: the member itself, not the echo)
__all__ = ["ProbeError", "Prober", "fetch_via_member", "parse_echo_body"]


async def fetch_via_member(
    member: Member,
    upstream: Upstream,
    target: EchoTarget,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    asks: int = 1,
) -> list[str]:
    """The egress IPs the echo names through one member, on one new connection: an ``http`` echo asked
    ``asks`` times on the proxy connection itself, in absolute form (the credentials on each; a connection
    that keeps one egress IP names it every time), an ``https`` one once through a CONNECT tunnel. Raises
    ProbeError."""
    deadline = asyncio.get_running_loop().time() + timeout
    https = target.scheme == "https"
    connector = Connector(upstream, ssl_context or ssl.create_default_context())
    try:
        stream = await connector.open(target.host, target.port, member, deadline=deadline, tls=https, tunnel=https)
    except ConnectFailure as exc:
        if exc.stage == "tcp":
            cause = f"timed out after {timeout:g}s" if exc.reason == "timeout" else exc.cause
            raise ProbeError(f"cannot connect to the member: {cause}", member_down=True) from None
        if exc.stage == "tunnel":
            raise ProbeError(_proxy_status(exc), member_down=exc.reason == "auth_failed") from None
        raise ProbeError(f"echo request failed: {exc.cause}") from None
    http = HttpConnection(stream, h11.CLIENT)
    times = 1 if https else max(1, asks)
    seen: list[str] = []
    try:
        async with asyncio.timeout_at(deadline):
            for i in range(times):
                last = i == times - 1
                seen.append(await ask_echo(http, target, None if https else upstream.proxy_authorization, close=last))
                if not last and not http.next_cycle():
                    break  # the proxy closes after each request: one answer is all this connection gives
    except TimeoutError:
        raise ProbeError(f"echo did not answer within {timeout:g}s") from None
    except SendFailure as exc:
        raise ProbeError(f"echo answer unreadable: {exc}") from None
    except (OSError, ssl.SSLError, h11.LocalProtocolError) as exc:
        raise ProbeError(f"echo request failed: {describe_error(exc)}") from None
    finally:
        stream.close()
    return seen


def _proxy_status(failure: ConnectFailure) -> str:
    return PROXY_407 if failure.reason == "auth_failed" else failure.detail


class Prober:
    def __init__(self, pair: Pair, guard: Guard, metrics: Metrics, settings: Settings,
                 verifier: Verifier | None = None) -> None:
        self.pair = pair
        self.verifier = verifier  # told what each sampled connection showed (two answers each, http echo)
        self.guard = guard
        self.metrics = metrics
        self.target = EchoTarget.from_url(settings.echo_url)
        self.samples = settings.probe_samples
        self.interval = settings.probe_interval
        self.timeout = settings.connect_timeout
        self.ssl_context = trust_context(settings) if self.target.scheme == "https" else None
        self.rounds = 0
        self._member_up_ip: dict[str, str] = {}
        self._allowlisted_ips: set[str] = set()

    async def run(self) -> None:
        if self.pair.direct:
            return
        while True:
            try:
                await self.probe_all()
            except Exception as exc:  # noqa: BLE001 - a bad round must not end discovery for good
                event(log, logging.ERROR, f"egress probe round failed ({type(exc).__name__}: {exc}); retrying "
                      f"in {self.interval:g}s")
            await asyncio.sleep(self.interval)

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe_member(m) for m in self.pair.members))
        self.rounds += 1
        self.update_metrics()

    async def probe_member(self, member: Member) -> None:
        assert self.pair.upstream is not None
        seen: list[str] = []
        per_connection: list[list[str]] = []
        error: ProbeError | None = None
        for _ in range(self.samples):
            try:
                ips = await fetch_via_member(member, self.pair.upstream, self.target, timeout=self.timeout,
                                             ssl_context=self.ssl_context, asks=2)
            except ProbeError as exc:
                error = exc
                continue
            seen.append(ips[0])
            per_connection.append(ips)
        if self.verifier is not None:
            self.verifier.probed(member, [ips for ips in per_connection if len(ips) > 1])
        self.apply_round(member, seen, str(error) if error else None, member_down=bool(error and error.member_down))

    def apply_round(
        self, member: Member, seen: list[str], error: str | None, *, member_down: bool = True, now: float | None = None
    ) -> None:
        """Fold one round's samples into the member's state (pure; tested without sockets).

        A round with no sample marks the member down only when the member itself failed; when only the
        echo behind it failed, the member keeps its state and its last verified egress IP.
        """
        member.last_probe = time.time() if now is None else now
        member.last_error = error
        was_up = member.up
        if not seen and not member_down:
            # The member answered (its CONNECT, its proxy auth): it is up; only the echo behind it failed,
            # so its egress IP is not re-verified this round and keeps its last known value.
            self.metrics.probes.labels(member.label, "echo_failed").inc()
            member.up = True
            event(log, logging.WARNING, f"probe through pair member {member.label} reached the member but not the "
                  f"IP echo ({error}); the member routes on, its egress IP is not re-verified", member=member.label)
            return
        if not seen:
            self.metrics.probes.labels(member.label, "member_down").inc()
            member.up = False
            if was_up is not False:
                event(log, logging.WARNING, f"pair member {member.label} is down: {error}", member=member.label)
            return
        self.metrics.probes.labels(member.label, "ok" if len(set(seen)) == 1 else "unstable").inc()
        member.up = True
        if was_up is False:
            event(log, logging.INFO, f"pair member {member.label} is up again", member=member.label)
        if member.readmit():
            event(log, logging.INFO, f"pair member {member.label} answered its probe: re-admitted after ejection",
                  member=member.label)
        before = member.samples[-1] if member.samples and member.stable else None
        if len(set(seen)) == 1:
            new = seen[0]
            if before is not None and new != before:
                self.metrics.egress_changes.labels(member.label).inc()
                event(
                    log,
                    logging.WARNING,
                    f"egress IP of pair member {member.label} changed from {before} to {new}",
                    member=member.label,
                    old_egress_ip=before,
                    egress_ip=new,
                    allowlisted=self.guard.is_allowlisted(new),
                )
                member.samples.clear()
            elif before is None and not member.samples:
                listed = self.guard.is_allowlisted(new)
                if listed is False:
                    event(log, logging.WARNING, f"pair member {member.label} leaves from {new}, which is not on "
                          "SIDECAR_ALLOWLIST: add it to the External Client App's Refresh Token IP Allowlist (and to "
                          "SIDECAR_ALLOWLIST)", member=member.label, egress_ip=new, allowlisted=False)
                else:
                    event(log, logging.INFO, f"pair member {member.label} leaves from {new}", member=member.label,
                          egress_ip=new, allowlisted=listed)
            member.samples.extend(seen)
        else:
            member.samples.extend(seen)
            if member.verifies:  # one address in front of several egress IPs: each connection's is asked on it
                if was_up is not True or len(set(member.samples)) != len(set(seen)):
                    event(log, logging.INFO, f"pair member {member.label} leaves from {', '.join(sorted(set(seen)))} "
                          "(a load-balanced address): the egress IP of each connection is verified on it",
                          member=member.label, egress_ips=sorted(set(seen)))
            else:
                event(
                    log,
                    logging.WARNING,
                    f"pair member {member.label} is unstable: one round saw {', '.join(sorted(set(seen)))}, and the "
                    "egress IP of its connections cannot be verified one by one; its egress IP is not claimed",
                    member=member.label,
                )
        if member.pinned_ip and member.stable and member.samples[-1] != member.pinned_ip:
            event(
                log,
                logging.WARNING,
                f"SIDECAR_EGRESS_IPS pins {member.label} to {member.pinned_ip}, but the echo sees "
                f"{member.samples[-1]}; fix the pin or check the echo URL",
                member=member.label,
            )

    def update_metrics(self) -> None:
        """Gauges follow the pair; series of IPs no longer observed are removed, not left stale.

        Counter series a partial-allowlist alert compares are created at 0 as soon as a member's egress
        is known: ``increase()`` cannot see a series' first step, so the first failure would be lost.
        """
        for m in self.pair.members:
            self.metrics.egress_changes.labels(m.label)
            for result in PROBE_RESULTS:
                self.metrics.probes.labels(m.label, result)
            for reason in FAILURE_REASONS:  # (an alert on their increase() sees the first failure too)
                self.metrics.member_failures.labels(m.label, reason)
            if m.egress_ip:
                for grant in ALLOWLISTED_GRANTS:
                    for outcome in ("success", "ip_restricted"):
                        self.metrics.token_requests.labels(grant, m.label, m.egress_ip, outcome)
            if m.up is None:
                continue  # not probed yet: no series, so a restart never looks like a member going down
            ip = m.egress_ip or EGRESS_UNKNOWN
            old = self._member_up_ip.get(m.label)
            if old is not None and old != ip:
                self.metrics.member_up.remove(m.label, old)
            self._member_up_ip[m.label] = ip
            self.metrics.member_up.labels(m.label, ip).set(1 if m.up else 0)
        if self.guard.evidence is not None:
            self.guard.evidence.update_metrics()  # refusals not seen for evidence.FORGET_AFTER leave the gauges
        if self.guard.allowlist:
            ips = self.pair.egress_ips()
            for gone in self._allowlisted_ips - set(ips):
                self.metrics.egress_allowlisted.remove(gone)
            self._allowlisted_ips = set(ips)
            for ip in ips:
                self.metrics.egress_allowlisted.labels(ip).set(1 if self.guard.allowlist.contains(ip) else 0)
            covered = sum(1 for ip in ips if self.guard.allowlist.contains(ip))
            self.metrics.allowlist_coverage.set(covered / len(ips) if ips else 0)
        else:  # no typed allowlist: nothing to cover (a 0 would read as "nothing allowlisted")
            self.metrics.allowlist_coverage.set(math.nan)
