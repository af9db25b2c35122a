"""The order of the measurements, and what each one records.

Every figure is measured for every contender in the same run. Latency and throughput are taken in
interleaved rounds (round r starts at contender r, then the next ...), so a slow spell of the machine
falls on all contenders alike; warm-up calls are made first and thrown away. A phase that fails is
recorded as "not measured" with the reason, and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import os
import platform
import selectors
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import report
from bench.client import (
    Chain,
    KeepAliveRunner,
    RequestsRunner,
    Route,
    Samples,
    TokenClient,
    TokenSource,
    bulk_fetch,
    concurrent_calls,
    new_connection_calls,
    open_tunnel,
    small_request,
)
from bench.contenders import (
    Mitmdump,
    Sidecar,
    Squid,
    Unavailable,
    WorldProcess,
    proc_cpu_seconds,
    proc_rss_kib,
    proxy_auth_header,
)
from bench.hotspots import CodecCost, Profile, codec_costs, from_cprofile, from_pyspy
from tests.harness import ROOT, SF_HOST

RESULTS = ROOT / "bench" / "RESULTS.md"
TOKEN_CONTENDERS = ["origin", "pair", "squid", "mitmdump", "sidecar"]
PASSTHROUGH_CONTENDERS = ["direct", "squid", "sidecar"]
CONCURRENCY_CONTENDERS = ["pair", "squid", "mitmdump", "sidecar"]


@dataclass(frozen=True)
class Plan:
    name: str
    rounds: int  # interleaved rounds for latency and throughput
    ka_calls: int  # keep-alive token calls per contender per round
    ka_warmup: int
    new_calls: int  # new-connection token calls per contender per round
    new_warmup: int
    bulk_bytes: int
    bulk_rounds: int
    warm_starts: int  # sidecar starts with an existing confdir (besides the cold one and the main one)
    hold: int = 200  # connections held open for the RSS figure
    conc_clients: int = 50
    conc_per_client: int = 10
    ablation_calls: int = 500  # per variant per round
    req_calls: int = 100  # keep-alive token calls with `requests` per contender per round
    req_warmup: int = 10
    profile_ka_calls: int = 3000
    profile_new_calls: int = 300
    soak_bursts: int = 5  # bursts of token calls after which RSS is read: does memory stay flat?
    soak_calls: int = 1000  # keep-alive calls per burst (plus a tenth as many on new connections)
    rest_calls: int = 1000  # keep-alive non-token requests (REST) per contender per round


FULL = Plan("full", rounds=3, ka_calls=1000, ka_warmup=200, new_calls=200, new_warmup=20,
            bulk_bytes=256 << 20, bulk_rounds=7, warm_starts=2)
QUICK = Plan("quick", rounds=2, ka_calls=100, ka_warmup=20, new_calls=20, new_warmup=5,
             bulk_bytes=32 << 20, bulk_rounds=1, warm_starts=1, ablation_calls=100, req_calls=20, req_warmup=3,
             profile_ka_calls=200, profile_new_calls=30, soak_bursts=3, soak_calls=200, rest_calls=100)


@dataclass
class Measured:
    """Samples of one contender in one phase, plus its proxy process's CPU over those samples."""

    samples: Samples = field(default_factory=Samples)
    cpu_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Results:
    plan: Plan
    facts: dict[str, str]
    unavailable: dict[str, str] = field(default_factory=dict)  # contender -> why not measured
    failed: dict[str, str] = field(default_factory=dict)  # phase -> error
    keepalive: dict[str, Measured] = field(default_factory=dict)
    newconn: dict[str, Measured] = field(default_factory=dict)
    passthrough: dict[str, list[float]] = field(default_factory=dict)  # GB/s per fetch
    passthrough_cpu: dict[str, float] = field(default_factory=dict)  # proxy CPU seconds per GB
    startup: dict[str, list[float]] = field(default_factory=dict)  # cold/warm -> seconds to /readyz
    memory: dict[str, dict[str, int]] = field(default_factory=dict)  # moment -> VmRSS/VmHWM KiB
    memory_errors: dict[str, int] = field(default_factory=dict)
    other_rss: dict[str, dict[str, int]] = field(default_factory=dict)  # squid/mitmdump idle & after
    import_rss: dict[str, int] = field(default_factory=dict)  # KiB
    concurrency: dict[str, tuple[Samples, float]] = field(default_factory=dict)
    requests_ka: dict[str, Samples] = field(default_factory=dict)  # keep-alive token calls with `requests`
    rest: dict[str, Measured] = field(default_factory=dict)  # keep-alive REST calls on a token host
    sidecar_internal_ms: list[float] = field(default_factory=list)  # the sidecar's own duration_ms, keep-alive
    ablation: dict[str, Measured] = field(default_factory=dict)
    verify_newconn: dict[str, Measured] = field(default_factory=dict)  # new connection per call, verification on/off
    verify_checks: dict[str, int] = field(default_factory=dict)  # connections whose egress IP was asked, per variant
    profile_ka: Profile | None = None
    profile_new: Profile | None = None
    notes: list[str] = field(default_factory=list)
    h11_ms: float | None = None  # h11's own work per keep-alive token call, in isolation (bench.hotspots)
    codec: dict[str, CodecCost] = field(default_factory=dict)  # h11 parse and serialise per exchange (bench.hotspots)
    profiled: dict[str, Samples] = field(default_factory=dict)
    elapsed_s: float = 0.0


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def phase(res: Results, name: str, world: WorldProcess | None = None) -> Iterator[None]:
    say(name)
    t0 = time.perf_counter()
    try:
        if world is not None:
            world.reset()
        yield
    except Exception as exc:  # noqa: BLE001 - one failed phase must not lose the others
        res.failed[name] = f"{type(exc).__name__}: {exc}"
        say(f"{name} FAILED: {exc}\n{traceback.format_exc()}")
    else:
        say(f"{name}: {time.perf_counter() - t0:.1f}s")


def machine_facts() -> dict[str, str]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        from mitmproxy.version import VERSION as mitm_version
    except ImportError:
        mitm_version = "not installed"
    commit = run("git", "rev-parse", "--short", "HEAD")
    dirty = run("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), {model or 'unknown model'}",
        "python": platform.python_version(),
        "mitmproxy": mitm_version,
        "openssl": ssl.OPENSSL_VERSION,
        "kernel": f"{platform.system()} {platform.release()}",
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "commit": f"{commit}{' + uncommitted changes' if dirty else ''}" if commit else "unknown",
    }


def _cpu(pid: int | None) -> float:
    return proc_cpu_seconds(pid) if pid else 0.0


def charge_cpu(out: Measured, pid: int | None, work: Callable[[], object]) -> None:
    """Run ``work``, adding the proxy process's CPU over it to ``out``."""
    c0 = _cpu(pid)
    work()
    if pid:
        out.cpu_s = (out.cpu_s or 0.0) + _cpu(pid) - c0


def interleaved(names: list[str], rounds: int, segment: Callable[[str], None]) -> None:
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            segment(name)


# ---- phases ------------------------------------------------------------------------------------

def measure_startup(res: Results, plan: Plan, workdir: Path, world: WorldProcess) -> Sidecar:
    """Cold start (fresh confdir: the CA is generated), warm starts, then the main instance (warm too)."""
    base = workdir / "sidecar"
    cold = Sidecar(base, world.ca, world.members).start()
    cold.stop()
    res.startup["cold"] = [cold.started_s]
    res.startup["warm"] = []
    for _ in range(plan.warm_starts):
        warm = Sidecar(base, world.ca, world.members).start()
        warm.stop()
        res.startup["warm"].append(warm.started_s)
    main = Sidecar(base, world.ca, world.members).start()
    res.startup["warm"].append(main.started_s)
    return main


def measure_tokens(res: Results, plan: Plan, routes: dict[str, Route], pids: dict[str, int | None],
                   source: TokenSource, sidecar: Sidecar, keepalive: bool) -> None:
    names = [n for n in TOKEN_CONTENDERS if n in routes]
    clients = {n: TokenClient(routes[n]) for n in names}
    chains = {n: Chain(source) for n in names}
    out = res.keepalive if keepalive else res.newconn
    for n in names:
        out[n] = Measured(cpu_s=0.0 if pids.get(n) else None)
    runners: dict[str, KeepAliveRunner] = {}
    try:
        for n in names:  # warm-up, thrown away (first connection, leaf certificate, pools)
            if keepalive:
                runners[n] = KeepAliveRunner(clients[n], chains[n])
                runners[n].run(plan.ka_warmup)
            else:
                new_connection_calls(clients[n], chains[n], plan.new_warmup)

        def segment(n: str) -> None:
            pid = pids.get(n)
            before = len(sidecar.token_durations_ms()) if (keepalive and n == "sidecar") else 0
            c0 = _cpu(pid)
            if keepalive:
                runners[n].run(plan.ka_calls, out[n].samples)
            else:
                new_connection_calls(clients[n], chains[n], plan.new_calls, out[n].samples)
            if pid:
                out[n].cpu_s = (out[n].cpu_s or 0.0) + _cpu(pid) - c0
            if keepalive and n == "sidecar":
                res.sidecar_internal_ms.extend(sidecar.token_durations_ms()[before:])

        interleaved(names, plan.rounds, segment)
    finally:
        for r in runners.values():
            r.close()


def measure_passthrough(res: Results, plan: Plan, routes: dict[str, Route], pids: dict[str, int | None],
                        target: tuple[str, int]) -> None:
    names = [n for n in PASSTHROUGH_CONTENDERS if n in routes]
    for n in names:
        bulk_fetch(routes[n], target, 4 << 20)  # warm-up
        res.passthrough[n] = []
        if pids.get(n):
            res.passthrough_cpu[n] = 0.0

    def segment(n: str) -> None:
        pid = pids.get(n)
        c0 = _cpu(pid)
        seconds = bulk_fetch(routes[n], target, plan.bulk_bytes)
        res.passthrough[n].append(plan.bulk_bytes / seconds / 1e9)
        if pid:
            res.passthrough_cpu[n] += (_cpu(pid) - c0) / (plan.bulk_bytes / 1e9)

    interleaved(names, plan.bulk_rounds, segment)
    for n in res.passthrough_cpu:
        res.passthrough_cpu[n] /= plan.bulk_rounds


def rss(pid: int) -> dict[str, int]:
    return proc_rss_kib(pid)


def import_footprint(res: Results) -> None:
    """RSS of a bare Python, and of one that imports the sidecar's service module (mitmproxy and all), nothing started."""
    code = "import {m}; print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"
    for label, module in (("Python alone", "sys"), ("Python + `import sidecar.app.service` (nothing started)",
                                                    "sidecar.app.service")):
        out = subprocess.run([sys.executable, "-c", code.format(m=module)], check=False, capture_output=True, text=True,
                             timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode == 0 and out.stdout.strip().isdigit():
            res.import_rss[label] = int(out.stdout.strip())


def hold_connections(res: Results, plan: Plan, sidecar: Sidecar, token_route: Route, tunnel_route: Route,
                     source: TokenSource, bulk: tuple[str, int]) -> None:
    """RSS of the sidecar while ``plan.hold`` intercepted keep-alive connections (each after one token call),
    then ``plan.hold`` passthrough tunnels (each after one small request), are open."""
    assert sidecar.proc is not None
    pid = sidecar.proc.pid
    client, chain = TokenClient(token_route), Chain(source)
    conns: list[Any] = []
    errors = 0
    try:
        for _ in range(plan.hold):
            try:
                conn = client.connect()
                conns.append(conn)
                runner = KeepAliveRunner(client, chain)
                runner.conn = conn
                s = runner.run(1)
                errors += s.errors
            except OSError:
                errors += 1
        time.sleep(0.5)
        res.memory[f"{plan.hold} token connections"] = rss(pid)
        res.memory_errors[f"{plan.hold} token connections"] = errors
    finally:
        for c in conns:
            c.close()
    tunnels: list[Any] = []
    errors = 0
    ctx = tunnel_route.context()
    try:
        for _ in range(plan.hold):
            try:
                tls = open_tunnel(tunnel_route, bulk, ctx=ctx)
                tunnels.append(tls)
                small_request(tls)
            except OSError:
                errors += 1
        time.sleep(0.5)
        res.memory[f"{plan.hold} passthrough tunnels"] = rss(pid)
        res.memory_errors[f"{plan.hold} passthrough tunnels"] = errors
    finally:
        for t in tunnels:
            t.close()


def measure_soak(res: Results, plan: Plan, sidecar: Sidecar, route: Route, source: TokenSource) -> None:
    """RSS after each of several bursts of token calls on one sidecar: a leak shows as a steady climb,
    a healthy process levels off."""
    assert sidecar.proc is not None
    client = TokenClient(route)
    for burst in range(1, plan.soak_bursts + 1):
        runner = KeepAliveRunner(client, Chain(source))
        try:
            runner.run(plan.soak_calls)
        finally:
            runner.close()
        new_connection_calls(client, Chain(source), max(1, plan.soak_calls // 10))
        res.memory[f"soak: after burst {burst} of {plan.soak_calls + plan.soak_calls // 10} calls"] = rss(
            sidecar.proc.pid)


REQUESTS_CONTENDERS = ["pair", "squid", "mitmdump", "sidecar"]


def measure_requests_client(res: Results, plan: Plan, routes: dict[str, Route], source: TokenSource) -> None:
    """Keep-alive token calls with Python ``requests``, the most common client of a Python app: it
    writes a request's head and body separately, which meets the receiver's delayed ACK (~40 ms per
    call) unless the receiver acknowledges at once. Interleaved rounds, as for the main figures."""
    for n in [n for n in REQUESTS_CONTENDERS if n in routes]:
        res.requests_ka[n] = Samples()
    runners = {n: RequestsRunner(routes[n], Chain(source)) for n in res.requests_ka}
    try:
        for r in runners.values():
            r.run(plan.req_warmup)
        for _ in range(plan.rounds):
            for n, r in runners.items():
                r.run(plan.req_calls, res.requests_ka[n])
    finally:
        for r in runners.values():
            r.close()


REST_CONTENDERS = ["pair", "mitmdump", "sidecar"]
REST_PATH = "/services/data/"


def measure_rest(res: Results, plan: Plan, workdir: Path, world: WorldProcess, routes: dict[str, Route],
                 pids: dict[str, int | None], stack: contextlib.ExitStack) -> None:
    """Keep-alive requests that are not token calls, on a token host (an app's REST API calls): both
    proxies decrypt them and send them on through a pair member (the sidecar with
    SIDECAR_ROUTE=salesforce, mitmdump in upstream mode), so the figure is each proxy's CPU per
    request. A fresh sidecar serves this phase, as its route setting differs from the main one's."""
    sc = Sidecar(workdir / "sidecar-rest", world.ca, world.members, extra_env={"SIDECAR_ROUTE": "salesforce"})
    stack.callback(sc.stop)
    sc.start()
    assert sc.proc is not None
    rts = {n: routes[n] for n in ("pair", "mitmdump") if n in routes}
    rts["sidecar"] = Route("sidecar", sc.ca_file, (("127.0.0.1", sc.proxy_port),))
    pid_of = {"sidecar": sc.proc.pid, "mitmdump": pids.get("mitmdump")}
    conns = {n: TokenClient(r).connect() for n, r in rts.items()}
    for n in rts:
        res.rest[n] = Measured(cpu_s=0.0 if pid_of.get(n) else None)

    def calls(n: str, count: int, out: Samples) -> None:
        conn = conns[n]
        for _ in range(count):
            try:
                t0 = time.perf_counter_ns()
                conn.request("GET", REST_PATH, headers={"Accept": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
                ns = time.perf_counter_ns() - t0
            except (OSError, http.client.HTTPException) as exc:
                out.error(type(exc).__name__)
                conn.close()
                conns[n] = conn = TokenClient(rts[n]).connect()
                continue
            if resp.status != 200 or not body:
                out.error(f"HTTP {resp.status}")
            out.ns.append(ns)

    try:
        for n in rts:
            calls(n, plan.ka_warmup, Samples())

        def segment(n: str) -> None:
            charge_cpu(res.rest[n], pid_of.get(n), lambda: calls(n, plan.rest_calls, res.rest[n].samples))

        interleaved(list(rts), plan.rounds, segment)
    finally:
        for c in conns.values():
            c.close()
        sc.stop()


def measure_concurrency(res: Results, plan: Plan, routes: dict[str, Route], source: TokenSource) -> None:
    for n in [n for n in CONCURRENCY_CONTENDERS if n in routes]:
        res.concurrency[n] = concurrent_calls(TokenClient(routes[n]), source, plan.conc_clients,
                                              plan.conc_per_client, deadline_s=180)


ABLATIONS = {
    "sidecar": ("as shipped", {}),
    "sidecar-nogrants": ("refresh token tracking off", {"BENCH_DISABLE": "grants"}),
    "sidecar-nolog": ("per-call INFO log line off (SIDECAR_LOG_LEVEL=WARNING)", {"SIDECAR_LOG_LEVEL": "WARNING"}),
    "sidecar-bare": ("both off", {"BENCH_DISABLE": "grants", "SIDECAR_LOG_LEVEL": "WARNING"}),
    "sidecar-noshield": ("rotation shield off", {"BENCH_DISABLE": "shield"}),
    "sidecar-noaudit": ("audit trail off", {"BENCH_DISABLE": "audit"}),
    "sidecar-noverify": ("egress verification off", {"BENCH_DISABLE": "verify"}),
    "sidecar-norecord": ("recording off", {"BENCH_DISABLE": "record,audit,grants"}),
}
VERIFY_VARIANTS = ("sidecar", "sidecar-noverify")


def start_variants(names: list[str], workdir: Path, world: WorldProcess, stack: contextlib.ExitStack,
                   prefix: str = "") -> dict[str, Sidecar]:
    """Fresh sidecars, one per ABLATIONS entry named (the shipped one through ``python -m sidecar``, the others
    through bench/sidecar_variant.py), each stopped with ``stack``."""
    procs: dict[str, Sidecar] = {}
    for name in names:
        env = ABLATIONS[name][1]
        sc = Sidecar(workdir / f"{prefix}{name}", world.ca, world.members,
                     module="bench.sidecar_variant" if env else "sidecar", extra_env=env)
        stack.callback(sc.stop)
        procs[name] = sc.start()
    return procs


def measure_ablation(res: Results, plan: Plan, workdir: Path, world: WorldProcess, routes: dict[str, Route],
                     pids: dict[str, int | None], source: TokenSource, stack: contextlib.ExitStack) -> None:
    """Keep-alive latency and CPU of the sidecar with parts of its per-call work switched off.

    Every variant, the shipped one included, is a fresh process, so none carries the history of the
    phases before (held connections, concurrency) and they differ only in what is switched off.
    """
    procs = start_variants(list(ABLATIONS), workdir, world, stack)
    rts = {n: Route(n, sc.ca_file, (("127.0.0.1", sc.proxy_port),)) for n, sc in procs.items()}
    for ref in ("mitmdump", "pair"):  # references measured in the same rounds
        if ref in routes:
            rts[ref] = routes[ref]
    runners = {n: KeepAliveRunner(TokenClient(r), Chain(source)) for n, r in rts.items()}
    for n in runners:
        res.ablation[n] = Measured(cpu_s=0.0 if n in procs or pids.get(n) else None)
    try:
        for r in runners.values():
            r.run(plan.ka_warmup)

        def segment(n: str) -> None:
            proc = procs[n].proc if n in procs else None
            pid = proc.pid if proc is not None else pids.get(n)
            charge_cpu(res.ablation[n], pid, lambda: runners[n].run(plan.ablation_calls, res.ablation[n].samples))

        interleaved(list(runners), plan.rounds, segment)
    finally:
        for r in runners.values():
            r.close()
        for sc in procs.values():
            sc.stop()


def verified_connections(sc: Sidecar) -> int:
    """How many upstream connections this sidecar has asked the IP echo on (its own metric)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{sc.admin_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("egress_sidecar_egress_checks_total{") and 'result="verified"' in line))


def measure_verification(res: Results, plan: Plan, workdir: Path, world: WorldProcess, routes: dict[str, Route],
                         source: TokenSource, stack: contextlib.ExitStack) -> None:
    """New connection per call through two fresh sidecars, one asking the IP echo on each new upstream
    connection (as shipped) and one not, with straight-to-pair in the same rounds: what verification adds to a
    call on a new connection. (On a pooled connection nothing is asked: the keep-alive ablation row shows it.)"""
    procs = start_variants(list(VERIFY_VARIANTS), workdir, world, stack, prefix="verify-")
    rts = {n: Route(n, sc.ca_file, (("127.0.0.1", sc.proxy_port),)) for n, sc in procs.items()}
    rts["pair"] = routes["pair"]
    clients = {n: TokenClient(r) for n, r in rts.items()}
    chains = {n: Chain(source) for n in rts}
    checks0: dict[str, int] = {}
    try:
        for n in rts:
            new_connection_calls(clients[n], chains[n], plan.new_warmup)
            res.verify_newconn[n] = Measured(cpu_s=0.0 if n in procs else None)
        for n, sc in procs.items():
            checks0[n] = verified_connections(sc)

        def segment(n: str) -> None:
            proc = procs[n].proc if n in procs else None
            charge_cpu(res.verify_newconn[n], proc.pid if proc is not None else None,
                       lambda: new_connection_calls(clients[n], chains[n], plan.new_calls, res.verify_newconn[n].samples))

        interleaved(list(rts), plan.rounds, segment)
        time.sleep(0.3)  # the last spare is opened after the last call
        for n, sc in procs.items():
            res.verify_checks[n] = verified_connections(sc) - checks0[n]
    finally:
        for sc in procs.values():
            sc.stop()


def find_pyspy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class ProfilerFailed(Exception):
    pass


def _token_windows(res: Results, plan: Plan, route: Route, source: TokenSource,
                   window: Callable[[str, Callable[[], Samples]], Profile]) -> None:
    """Warm up, then profile a window of keep-alive calls and one of new-connection calls."""
    client, chain = TokenClient(route), Chain(source)
    runner = KeepAliveRunner(client, chain)
    try:
        runner.run(plan.ka_warmup)
        res.profile_ka = window("keep-alive", lambda: runner.run(plan.profile_ka_calls))
    finally:
        runner.close()
    new_connection_calls(client, chain, plan.new_warmup)
    res.profile_new = window("new connection", lambda: new_connection_calls(client, chain, plan.profile_new_calls))


PYSPY_RATE = 250


def _wait_sampling(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Until py-spy says it samples (it has attached), so the samples cover the window that follows."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"Sampling process" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                raise ProfilerFailed(seen.decode(errors="replace").strip()[-400:] or "py-spy did not start sampling")
            if sel.select(left):
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise ProfilerFailed(seen.decode(errors="replace").strip()[-400:] or "py-spy exited")
                seen += chunk


def profile_pyspy(res: Results, plan: Plan, workdir: Path, spy: str, sidecar: Sidecar, source: TokenSource) -> None:
    """py-spy samples (all threads) of the running sidecar while the bench sends token calls."""
    assert sidecar.proc is not None
    pid = sidecar.proc.pid

    def window(name: str, work: Callable[[], Samples]) -> Profile:
        out = workdir / f"py-spy-{name.replace(' ', '-')}.txt"
        # --nonblocking: read the stacks without stopping the sidecar (less perturbation; a few
        # inconsistent samples are dropped by py-spy itself).
        proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", str(PYSPY_RATE), "--nonblocking",
                                 "--format", "raw", "--threads", "--output", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        text = ""
        try:
            _wait_sampling(proc)
            t0 = time.perf_counter()
            samples = work()
            sampled_s = time.perf_counter() - t0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                text = proc.communicate(timeout=60)[0].decode(errors="replace")
            except subprocess.TimeoutExpired:
                proc.kill()
                text = proc.communicate(timeout=10)[0].decode(errors="replace")
        if not out.exists():
            raise ProfilerFailed(text.strip()[-400:])
        res.profiled[name] = samples
        return from_pyspy(out, len(samples.ns), sampled_s, PYSPY_RATE)

    _token_windows(res, plan, Route("sidecar", sidecar.ca_file, (("127.0.0.1", sidecar.proxy_port),)), source, window)


def profile_cprofile(res: Results, plan: Plan, workdir: Path, world: WorldProcess, source: TokenSource) -> None:
    """Fallback: a sidecar with a cProfile window opened by SIGUSR1 and closed by SIGUSR2."""
    prefix = workdir / "profile"
    sc = Sidecar(workdir / "sidecar-profile", world.ca, world.members, module="bench.sidecar_variant",
                 extra_env={"BENCH_PROFILE_PREFIX": str(prefix)})
    n = 0
    try:
        sc.start()

        def window(name: str, work: Callable[[], Samples]) -> Profile:
            nonlocal n
            assert sc.proc is not None
            sc.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
            samples = work()
            sc.proc.send_signal(signal.SIGUSR2)
            done = Path(f"{prefix}-{n}.done")
            deadline = time.monotonic() + 30
            while not done.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not done.exists():
                raise ProfilerFailed("the profiled sidecar did not write its profile within 30s")
            res.profiled[name] = samples
            n += 1
            return from_cprofile(Path(f"{prefix}-{n - 1}.prof"), len(samples.ns))

        _token_windows(res, plan, Route("sidecar", sc.ca_file, (("127.0.0.1", sc.proxy_port),)), source, window)
    finally:
        sc.stop()


def measure_profile(res: Results, plan: Plan, workdir: Path, world: WorldProcess, sidecar: Sidecar,
                    source: TokenSource, profiler: str) -> None:
    spy = find_pyspy() if profiler in ("auto", "py-spy") else None
    if profiler == "py-spy" and not spy:
        raise ProfilerFailed("--profiler py-spy: py-spy is not installed (pip install py-spy)")
    if spy:
        try:
            profile_pyspy(res, plan, workdir, spy, sidecar, source)
            return
        except ProfilerFailed as exc:
            res.notes.append(f"py-spy could not profile the sidecar ({exc}); cProfile was used instead.")
    elif profiler == "auto":
        res.notes.append("py-spy is not installed, so the profile is cProfile's (`pip install py-spy` for "
                         "py-spy's per-thread samples).")
    profile_cprofile(res, plan, workdir, world, source)


# ---- the run -----------------------------------------------------------------------------------

def run(plan: Plan, keep_tmp: bool = False, profiler: str = "auto") -> Results:
    t_start = time.perf_counter()
    res = Results(plan, machine_facts())
    workdir = Path(tempfile.mkdtemp(prefix="egress-bench-"))
    say(f"{plan.name} run in {workdir}")
    res.codec = codec_costs(200 if plan.name == "quick" else 2000)  # before anything runs
    res.h11_ms = res.codec["token call"].total_ms
    stack = contextlib.ExitStack()
    try:
        world = WorldProcess(workdir).start()
        stack.callback(world.stop)
        source = TokenSource(world.tokens)
        auth = proxy_auth_header()
        routes: dict[str, Route] = {
            "origin": Route("origin", world.ca, origin=world.salesforce),
            "pair": Route("pair", world.ca, tuple(world.members), auth),
        }
        tunnel_routes: dict[str, Route] = {"direct": Route("direct", world.ca)}
        pids: dict[str, int | None] = {}

        squid = Squid(workdir, world.members, SF_HOST, world.bulk[1])
        try:
            squid.start()
            stack.callback(squid.stop)
            assert squid.proc is not None
            pids["squid"] = squid.proc.pid
            routes["squid"] = Route("squid", world.ca, (("127.0.0.1", squid.port),))
            tunnel_routes["squid"] = routes["squid"]
            res.facts["squid"] = squid.version
            res.other_rss["Squid idle"] = rss(squid.proc.pid)
        except Unavailable as exc:
            res.unavailable["squid"] = str(exc)
            res.facts["squid"] = "not measured"
        mitm = Mitmdump(workdir, world.members[0], world.ca)
        try:
            mitm.start()
            stack.callback(mitm.stop)
            assert mitm.proc is not None
            pids["mitmdump"] = mitm.proc.pid
            routes["mitmdump"] = Route("mitmdump", mitm.ca_file, (("127.0.0.1", mitm.port),))
            time.sleep(0.3)
            res.other_rss["mitmdump idle"] = rss(mitm.proc.pid)
        except Unavailable as exc:
            res.unavailable["mitmdump"] = str(exc)

        say("sidecar start to ready (cold, then warm)")
        sidecar = measure_startup(res, plan, workdir, world)  # not optional: if it fails, the run fails
        stack.callback(sidecar.stop)
        assert sidecar.proc is not None
        pids["sidecar"] = sidecar.proc.pid
        time.sleep(0.5)
        res.memory["idle (after start)"] = rss(sidecar.proc.pid)
        routes["sidecar"] = Route("sidecar", sidecar.ca_file, (("127.0.0.1", sidecar.proxy_port),))
        tunnel_routes["sidecar"] = Route("sidecar", world.ca, (("127.0.0.1", sidecar.proxy_port),))

        with phase(res, "token calls, keep-alive", world):
            measure_tokens(res, plan, routes, pids, source, sidecar, keepalive=True)
        with phase(res, "token calls, new connection per call", world):
            measure_tokens(res, plan, routes, pids, source, sidecar, keepalive=False)
        with phase(res, "token calls with Python requests", world):
            measure_requests_client(res, plan, routes, source)
        with phase(res, "REST calls on a token host, keep-alive", world):
            measure_rest(res, plan, workdir, world, routes, pids, stack)
        with phase(res, "passthrough throughput", world):
            measure_passthrough(res, plan, tunnel_routes, pids, world.bulk)
        with phase(res, f"sidecar RSS with {plan.hold} connections", world):
            hold_connections(res, plan, sidecar, routes["sidecar"], tunnel_routes["sidecar"], source, world.bulk)
        with phase(res, "import footprint"):
            import_footprint(res)
        with phase(res, f"concurrency: {plan.conc_clients * plan.conc_per_client} calls, {plan.conc_clients} clients", world):
            measure_concurrency(res, plan, routes, source)
        res.memory["after all of the above"] = rss(sidecar.proc.pid)
        with phase(res, f"soak: {plan.soak_bursts} bursts of token calls", world):
            measure_soak(res, plan, sidecar, routes["sidecar"], source)
        for name in ("squid", "mitmdump"):
            if pids.get(name):
                res.other_rss[f"{'Squid' if name == 'squid' else name} after load"] = rss(pids[name])  # type: ignore[arg-type]
        with phase(res, "ablation: what the sidecar's per-call work costs", world):
            measure_ablation(res, plan, workdir, world, routes, pids, source, stack)
        with phase(res, "egress verification: new connection per call, verification on and off", world):
            measure_verification(res, plan, workdir, world, routes, source, stack)
        with phase(res, "profile of the token path", world):
            measure_profile(res, plan, workdir, world, sidecar, source, profiler)
        sidecar.stop()
    finally:
        stack.close()
        if keep_tmp:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    res.elapsed_s = time.perf_counter() - t_start
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of egress-sidecar next to straight-to-pair, Squid and plain mitmdump, on "
        "loopback with the simulated pair and Salesforce. Writes bench/RESULTS.md and prints it.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="smoke run with small counts; prints the report, writes it only with --out")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where to write the report (default {RESULTS.relative_to(ROOT)}; none with --quick)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (logs, profiles)")
    parser.add_argument("--profiler", choices=("auto", "py-spy", "cprofile"), default="auto",
                        help="profile the token path with py-spy (auto: when installed) or cProfile")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    res = run(plan, keep_tmp=args.keep_tmp, profiler=args.profiler)
    text = report.render(res)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        out.write_text(text)
        say(f"wrote {out}")
    print(text)
    return 0
