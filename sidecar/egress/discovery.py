"""Egress discovery: learn which static IP each pair member leaves from, by asking an IP echo.

Each probe round sends ``SIDECAR_PROBE_SAMPLES`` requests to ``SIDECAR_ECHO_URL`` through every member,
each on a new connection (QuotaGuard may balance per connection). A round whose samples agree sets
the member's egress IP (and a different one than before is an *egress change*: logged and counted);
samples that disagree make the member *unstable*, and its egress is not claimed. A member that
answers no sample is down.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from sidecar.config import Settings, Upstream
from sidecar.egress.guard import Guard
from sidecar.egress.pair import Member, Pair
from sidecar.logs import event
from sidecar.metrics import EGRESS_UNKNOWN, PROBE_RESULTS, Metrics
from sidecar.net.http1 import HttpConnection
from sidecar.net.upstream import (
    ConnectFailure,
    Connector,
    SendFailure,
    authority,
    describe_error,
    read_answer,
)
from sidecar.ops.trust import trust_context
from sidecar.token.call import ALLOWLISTED_GRANTS

log = logging.getLogger("egress_sidecar.discovery")


class ProbeError(Exception):
    """A probe through a member failed; the message is safe to show (no credentials).

    ``member_down`` says the member itself failed (unreachable, or it refused our credentials), as
    opposed to the echo service behind it: an echo outage must not take a working member out of
    routing, or a third-party IP echo could stop every token refresh.
    """

    def __init__(self, message: str, member_down: bool = False) -> None:
        super().__init__(message)
        self.member_down = member_down


def parse_echo_body(body: bytes) -> str:
    """The IP in an echo answer: ``{"ip": "A.B.C.D"}`` JSON or a bare IP. Raises ProbeError."""
    text = body.decode("utf-8", errors="replace").strip()
    candidate = text
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise ProbeError("echo answer is not valid JSON") from None
        candidate = data.get("ip") if isinstance(data, dict) else None
        if not isinstance(candidate, str):
            raise ProbeError('echo JSON has no "ip" string')
    try:
        return str(ipaddress.ip_address(candidate.strip()))
    except ValueError:
        raise ProbeError(f"echo answer is not an IP address: {text[:60]!r}") from None


@dataclass(frozen=True)
class EchoTarget:
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def from_url(cls, url: str) -> EchoTarget:
        p = urlsplit(url)
        port = p.port or (443 if p.scheme == "https" else 80)
        return cls(p.scheme, p.hostname or "", port, (p.path or "/") + (f"?{p.query}" if p.query else ""))


MAX_ECHO_BYTES = 64 * 1024


async def fetch_via_member(
    member: Member,
    upstream: Upstream,
    target: EchoTarget,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """GET the echo URL through one member, on a new connection: an ``https`` echo through a CONNECT
    tunnel, an ``http`` one as a proxy request in absolute form (the credentials on it). Raises ProbeError."""
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
    host = authority(target.host, target.port) if target.port not in (80, 443) else target.host.encode("idna")
    headers = [(b"Host", host), (b"Accept", b"application/json"), (b"Connection", b"close")]
    if https:
        request = h11.Request(method=b"GET", target=target.path.encode(), headers=headers)
    else:  # a plain-HTTP proxy request, absolute-form, credentials on it
        request = h11.Request(method=b"GET", target=b"http://" + host + target.path.encode(),
                              headers=[*headers, (b"Proxy-Authorization", upstream.proxy_authorization)])
    try:
        async with asyncio.timeout_at(deadline):
            http = HttpConnection(stream, h11.CLIENT)
            await http.send(request, h11.EndOfMessage())
            answer = await read_answer(http, b"GET", MAX_ECHO_BYTES)
    except TimeoutError:
        raise ProbeError(f"echo did not answer within {timeout:g}s") from None
    except SendFailure as exc:
        raise ProbeError(f"echo answer unreadable: {exc}") from None
    except (OSError, ssl.SSLError, h11.LocalProtocolError) as exc:
        raise ProbeError(f"echo request failed: {describe_error(exc)}") from None
    finally:
        stream.close()
    if answer.status == 407:
        raise ProbeError(_PROXY_407, member_down=True)
    if answer.status in (403, 502, 503):
        raise ProbeError(f"proxy answered HTTP {answer.status}")
    if answer.status != 200:
        raise ProbeError(f"echo answered HTTP {answer.status}")
    return answer.body


_PROXY_407 = "proxy refused the credentials (407): check USER:PASS in QUOTAGUARDSTATIC_URL"


def _proxy_status(failure: ConnectFailure) -> str:
    return _PROXY_407 if failure.reason == "auth_failed" else failure.detail


class Prober:
    def __init__(self, pair: Pair, guard: Guard, metrics: Metrics, settings: Settings) -> None:
        self.pair = pair
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
        error: ProbeError | None = None
        for _ in range(self.samples):
            try:
                body = await fetch_via_member(
                    member, self.pair.upstream, self.target, timeout=self.timeout, ssl_context=self.ssl_context
                )
                seen.append(parse_echo_body(body))
            except ProbeError as exc:
                error = exc
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
            event(
                log,
                logging.WARNING,
                f"pair member {member.label} is unstable: one round saw {', '.join(sorted(set(seen)))}; "
                "its egress IP is not claimed",
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
