"""Summarise a profile of the sidecar's token path: where the time of one token call goes.

Two sources give the same :class:`Profile`:

- **py-spy** (preferred, when installed): wall-clock stack samples of every thread of the running
  sidecar, taken from outside with little overhead. Samples of the event loop's thread waiting in
  ``epoll`` are idle; the others are split into *stages* of a token call by the frames on the stack
  (our hooks, the sender, mitmproxy's hook dispatch, its TLS, its HTTP layers, socket writes).
  Other threads (the refresh token writer) are reported apart.
- **cProfile** (fallback, standard library): deterministic, but slower, and since Python 3.12 it
  sees every thread's calls on one stack, so a busy second thread blurs the attribution. Own time
  is grouped by where the code lives.
"""

from __future__ import annotations

import pstats
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Profile:
    tool: str
    calls: int  # token calls in the profiled window
    busy_ms: float  # the event loop thread's busy time per call (under the profiler)
    stages: list[tuple[str, float]]  # (stage or group, ms per call), largest first
    top: list[tuple[str, float, str]]  # (function or line, ms per call, extra)
    key: list[tuple[str, float]]  # (our function, inclusive ms per call)
    threads: list[tuple[str, float]] = field(default_factory=list)  # other threads' busy ms per call
    samples: int = 0
    caveat: str = ""
    window_s: float = 0.0
    rate: int = 0


# ---- py-spy --------------------------------------------------------------------------------------

IDLE_LEAVES = ("EpollSelector.select ", "_PollLikeSelector.select ", "Condition.wait ", "Event.wait ",
               "Thread._wait_for_tstate_lock ", "BaseSelector.select ", "select (selectors.py")
SEND_LEAVES = ("_SelectorSocketTransport.write ", "_SelectorTransport.write ", "socket.send")
# (stage, frame markers): the first stage with a marker anywhere on the stack wins.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("refresh token tracking on the event loop (`GrantTracker.on_call`)", ("GrantTracker.",)),
    ("metrics and the JSON log line (`Recorder.record`)", ("Recorder.record ",)),
    ("classify the answer (`TokenCore.finish`)", ("TokenCore.finish ", "TokenCore._finish ")),
    ("sending through the member (`sidecar/token/sender.py`, `sidecar/net/upstream.py`: pool, TLS, write, read)",
     ("TokenSender.", "UpstreamPool.", "read_answer ", "request_events ")),
    ("routing: detect, grant type, guard (`TokenCore`)", ("TokenCore.",)),
    ("HTTP/1.1 framing (h11, `sidecar/net/http1.py`)", ("HttpConnection.", "(h11/")),
    ("TLS and sockets (`ssl` module, `sidecar/net/streams.py`)", ("TlsStream.", "SocketStream.", "LeafContexts.")),
    ("token lane: serving a request (`Lane`)", ("Lane.",)),
    ("other sidecar addons and code (`addons/`, `sidecar/`)", ("(addons/", "(sidecar/")),
    ("mitmproxy: client-side TLS (pyOpenSSL, certificates)", ("layers/tls.py", "(OpenSSL/", "tlsconfig.py",
                                                           "mitmproxy/certs.py")),
    ("mitmproxy: dispatching hooks to the addons (`AddonManager`)", ("AddonManager.",)),
    ("mitmproxy: proxy layers (HTTP/1 parsing and serialising, events, flow model)", ("(mitmproxy/",)),
]
OTHER_STAGE = "asyncio event loop and the rest"
SEND_STAGE = ("socket `send()` to the client or the member (mostly waiting: the woken peer often runs on this CPU "
              "before the sidecar gets it back)")
KEY_MARKERS = [
    ("`Lane._one` (one request on the lane: read, route, answer)", "Lane._one "),
    ("`HttpConnection.next_event` (h11: reading heads and bodies)", "HttpConnection.next_event "),
    ("`HttpConnection.send` (h11: framing)", "HttpConnection.send "),
    ("`TlsStream` (TLS, `ssl` module)", "TlsStream."),
    ("`TokenCore.detect` and `.refusal` (token call? sendable?)", "TokenCore.detect "),
    ("`TokenCore.answer` (grant type, guard, send)", "TokenCore.answer "),
    ("`TokenSender.send` (pool, write, read)", "TokenSender.send "),
    ("`read_answer` (read Salesforce's answer)", "read_answer "),
    ("`TokenCore.finish` (classify, then record soon)", "TokenCore.finish "),
    ("`Recorder.record` (metrics + log line)", "Recorder.record "),
    ("`logs.event` (one JSON log line)", "event (sidecar/logs.py"),
    ("`GrantTracker.on_call` (rotation tracking)", "GrantTracker.on_call "),
    ("`AddonManager.trigger_event` (hook dispatch, any addon)", "AddonManager.trigger_event "),
]


def _is_idle(leaf: str) -> bool:
    return leaf.startswith(IDLE_LEAVES) or "time.sleep" in leaf


LOOP_FRAMES = ("Handle._run ", "BaseEventLoop._run_once ")


def _stage(frames: list[str]) -> str:
    if frames and frames[-1].startswith(SEND_LEAVES):
        return SEND_STAGE
    # Only what the event loop runs: the frames below it (the CLI, asyncio.run) are on every stack.
    loop = [i for i, f in enumerate(frames) if f.startswith(LOOP_FRAMES)]
    frames = frames[loop[-1] + 1:] if loop else frames
    for stage, markers in STAGES:
        if any(m in f for f in frames for m in markers):
            return stage
    return OTHER_STAGE


def from_pyspy(path: Path, calls: int, window_s: float, rate: int, top_n: int = 12) -> Profile:
    """Read py-spy's ``--format raw --threads`` output (``thread (TID): NAME;frame;...;leaf COUNT``)."""
    main_total = idle = 0
    stages: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    key: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        leaf = frames[-1] if frames else ""
        if not thread.endswith("MainThread"):
            if frames and not _is_idle(leaf):
                threads[thread.partition(": ")[2] or thread] += n
            continue
        main_total += n
        if not frames or _is_idle(leaf):
            idle += n
            continue
        stages[_stage(frames)] += n
        leaves[leaf] += n
        for label, marker in KEY_MARKERS:
            if any(marker in f for f in frames):
                key[label] += n
    busy = main_total - idle
    # Every sample of the event loop's thread stands for an equal slice of the window.
    ms = window_s * 1e3 / main_total / max(1, calls) if main_total else 0.0
    return Profile(
        tool="py-spy",
        calls=calls,
        busy_ms=busy * ms,
        stages=[(s, c * ms) for s, c in stages.most_common()],
        top=[(leaf, c * ms, f"{c / busy:.0%}" if busy else "") for leaf, c in leaves.most_common(top_n)],
        key=[(label, key[label] * ms) for label, _m in KEY_MARKERS if key[label]],
        threads=[(t, c * ms) for t, c in threads.most_common()],
        samples=main_total,
        window_s=window_s,
        rate=rate,
    )


# ---- cProfile (fallback) -------------------------------------------------------------------------

OWN = (f"{ROOT / 'sidecar'}/", f"{ROOT / 'addons'}/")
_OWN_GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("sidecar: logging (JSON log line)", ("logs.py",)),
    ("sidecar: refresh token tracking (grants, sqlite)", ("grants.py", "grantstore.py")),
    ("sidecar: metrics", ("metrics.py",)),
]
_FILE_GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("sidecar: logging (JSON log line)", ("/logging/",)),
    ("sidecar: refresh token tracking (grants, sqlite)", ("/sqlite3/",)),
    ("sidecar: metrics", ("/prometheus_client/",)),
    ("TLS (ssl, pyOpenSSL, cryptography)", ("/ssl.py", "/OpenSSL/", "/cryptography/")),
    ("mitmproxy: proxy layers", ("/mitmproxy/proxy/",)),
    ("mitmproxy: hook dispatch and options", ("/mitmproxy/addons/", "/mitmproxy/addonmanager.py",
                                              "/mitmproxy/hooks.py", "/mitmproxy/optmanager.py")),
    ("mitmproxy: flow and HTTP model, utils", ("/mitmproxy/",)),
    ("asyncio", ("/asyncio/",)),
]
_BUILTIN_GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("idle", ("select.epoll", "_thread.lock", "_thread.RLock", "select.select", "select.poll")),
    ("TLS (ssl, pyOpenSSL, cryptography)", ("_ssl.", "_openssl", "_rust")),
    ("socket send/recv syscalls", ("_socket.socket",)),
    ("sidecar: refresh token tracking (grants, sqlite)", ("sqlite3",)),
]
CPROFILE_KEYS = [
    ("`Lane._one` (one request on the lane)", "sidecar/proxy/lane.py", "_one"),
    ("`TokenCore.answer` (grant type, guard, send)", "sidecar/token/core.py", "answer"),
    ("`TokenSender.send` (pool, write, read)", "sidecar/token/sender.py", "send"),
    ("`TokenCore.finish` (classify, then record soon)", "sidecar/token/core.py", "finish"),
    ("`Recorder.record` (metrics + log line)", "sidecar/ops/record.py", "record"),
    ("`GrantTracker.on_call` (rotation tracking)", "sidecar/state/grants.py", "on_call"),
]


def _group(filename: str, func: str) -> str:
    if filename == "~" or filename.startswith("<"):
        for group, needles in _BUILTIN_GROUPS:
            if any(n in func for n in needles):
                return group
        return "builtins"
    if filename.startswith(OWN):
        name = Path(filename).name
        for group, names in _OWN_GROUPS:
            if name in names:
                return group
        return "sidecar: token path (addons/, sidecar/)"
    for group, needles in _FILE_GROUPS:
        if any(n in filename for n in needles):
            return group
    return "other standard library"


def _label(filename: str, line: int, func: str) -> str:
    if filename == "~":
        return func
    parts = Path(filename).parts
    for anchor in ("mitmproxy", "sidecar", "addons", "asyncio", "OpenSSL", "logging"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return f"{'/'.join(parts[i:])}:{line} {func}"
    return f"{Path(filename).name}:{line} {func}"


def from_cprofile(path: Path, calls: int, top_n: int = 12) -> Profile:
    raw = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    groups: Counter[str] = Counter()
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in raw.items():
        g = _group(filename, func)
        groups[g] += tt
        if g != "idle":
            rows.append((_label(filename, line, func), nc, tt, ct))
    busy = sum(v for g, v in groups.items() if g != "idle")
    per = 1e3 / max(1, calls)
    rows.sort(key=lambda r: -r[2])
    key = []
    for label, suffix, name in CPROFILE_KEYS:
        ct = sum(v[3] for (fn, _ln, f), v in raw.items() if f == name and fn.endswith("/" + suffix))
        if ct:
            key.append((label, ct * per))
    return Profile(
        tool="cProfile",
        calls=calls,
        busy_ms=busy * per,
        stages=[(g, v * per) for g, v in groups.most_common() if g != "idle"],
        top=[(f"{name}", tt * per, f"{nc / max(1, calls):.1f} calls/token call") for name, nc, tt, _ct in rows[:top_n]],
        key=key,
        caveat="Own time by where the code lives. Since Python 3.12 cProfile "
        "records every thread's calls on one stack, so the refresh token writer thread blurs the attribution; "
        "read it as a rough guide.",
    )


# -- h11 in isolation -------------------------------------------------------------------------------
_REQUEST = (b"POST /services/oauth2/token HTTP/1.1\r\nHost: login.salesforce.com\r\nAccept-Encoding: identity\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 160\r\n\r\n" + b"f" * 160)
_ANSWER = (b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\nContent-Type: application/json;charset=UTF-8\r\n"
           b"Cache-Control: no-cache,must-revalidate,max-age=0,no-store,private\r\nVary: Accept-Encoding\r\n"
           b"Strict-Transport-Security: max-age=63072000\r\nX-Content-Type-Options: nosniff\r\n"
           b"Content-Length: 700\r\n\r\n" + b"j" * 700)
# An app's REST call on a token host (bench/run.py measure_rest) and an answer of its size.
_REST_REQUEST = (b"GET /services/data/ HTTP/1.1\r\nHost: login.salesforce.com\r\nAccept-Encoding: identity\r\n"
                 b"Accept: application/json\r\n\r\n")
_REST_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 300\r\n\r\n" + b"v" * 300)
CODEC_CASES = {"token call": (_REQUEST, _ANSWER), "REST request": (_REST_REQUEST, _REST_ANSWER)}


@dataclass
class CodecCost:
    """What h11 costs one exchange through the sidecar, in isolation (no I/O, warm caches), ms."""

    read_ms: float  # parsing: the app's request and the server's answer (receive_data, next_event)
    write_ms: float  # serialising: the request on and the answer back (the sidecar's builders, send)

    @property
    def total_ms(self) -> float:
        return self.read_ms + self.write_ms


def exchange(server: object, client: object, request: bytes, answer: bytes,
             clock: list[float] | None = None) -> tuple[bytes, bytes]:
    """One exchange as the lane and the sender or forwarder run it, on h11 connections ``server`` (the app's
    side) and ``client`` (the upstream side), with the events built as sidecar.net.http1 builds them: the
    app's request read, written on, the answer read, written back, both connections made ready for the next.
    Returns the bytes written upstream and back to the app; ``clock`` (read, write) accumulates seconds."""
    import time

    import h11

    from sidecar.net.http1 import raw_headers, request_event, response_event

    assert isinstance(server, h11.Connection) and isinstance(client, h11.Connection)
    t0 = time.perf_counter()
    server.receive_data(request)
    head = server.next_event()
    events = [server.next_event()]
    while not isinstance(events[-1], h11.EndOfMessage):
        events.append(server.next_event())
    t1 = time.perf_counter()
    assert isinstance(head, h11.Request)
    sent = client.send(request_event(head.method, head.target, raw_headers(head), parsed=True)) or b""
    for e in events:
        sent += client.send(h11.Data(data=e.data) if isinstance(e, h11.Data) else e) or b""
    t2 = time.perf_counter()
    client.receive_data(answer)
    reply = client.next_event()
    events = [client.next_event()]
    while not isinstance(events[-1], h11.EndOfMessage):
        events.append(client.next_event())
    t3 = time.perf_counter()
    assert isinstance(reply, h11.Response)
    back = server.send(response_event(reply.status_code, bytes(reply.reason), raw_headers(reply), parsed=True)) or b""
    for e in events:
        back += server.send(h11.Data(data=e.data) if isinstance(e, h11.Data) else e) or b""
    server.start_next_cycle()
    client.start_next_cycle()
    t4 = time.perf_counter()
    if clock is not None:
        clock[0] += (t1 - t0) + (t3 - t2)
        clock[1] += (t2 - t1) + (t4 - t3)
    return sent, back


def codec_costs(calls: int = 2000) -> dict[str, CodecCost]:
    """h11's read and write cost per exchange, for a keep-alive token call and a REST request (each the best
    of 3 runs of ``calls``). Under load the same steps cost more (colder caches). Issue 22 asked whether
    parsing is worth a second parser (httptools): set it next to the CPU per call the bench measured."""
    import h11

    out: dict[str, CodecCost] = {}
    for name, (request, answer) in CODEC_CASES.items():
        runs = []
        for _ in range(3):
            server, client = h11.Connection(h11.SERVER), h11.Connection(h11.CLIENT)
            clock = [0.0, 0.0]
            for _ in range(calls):
                exchange(server, client, request, answer, clock)
            runs.append(CodecCost(clock[0] / calls * 1e3, clock[1] / calls * 1e3))
        out[name] = min(runs, key=lambda c: c.total_ms)
    return out


def h11_per_call_ms(calls: int = 2000) -> float:
    """What h11 costs one keep-alive token call on this machine, in isolation (read and write)."""
    return codec_costs(calls)["token call"].total_ms
