"""Name lookups (sidecar/net/resolver.py): slow DNS for names clients ask for never reaches a token call.

Was (issue 24): every connection, to an IP literal too, was resolved with ``loop.getaddrinfo`` in the
default executor (6 threads on 2 cores). Eight CONNECTs to names whose lookups hung held them all; a
refresh then got ``502 upstream_unreachable`` ("cannot connect to pair member ...: timed out"), both
members were counted down and the sidecar said it was not ready. Slow DNS is made here with a
``sitecustomize`` in the sidecar's own process that makes ``socket.getaddrinfo`` hang for one domain: the
real sidecar, its real code path, and nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.config import ConfigError, load_settings
from sidecar.egress.pair import build_pair
from sidecar.net.resolver import LookupFailed, Resolver, numeric_infos, parse_ip
from sidecar.net.streams import open_tcp
from sidecar.sim.certs import TestCA
from tests.harness import (
    ECHO_HOST,
    ROOT,
    SF_HOST,
    SidecarProcess,
    World,
    metric_value,
    read_until_closed,
    redeem,
    wait_until,
)
from tests.redis_server import REDIS_KEY, RedisServer
from tests.scripted_origin import ScriptedOrigin, ok

SLOW = ".slow.test"
HANG_SECONDS = 8.0
TUNNELS = 8

SITECUSTOMIZE = '''
import os, socket, time
_real = socket.getaddrinfo
_log = os.environ["SLOW_DNS_LOG"]


def getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else str(host)
    with open(_log, "a") as f:
        f.write(name + "\\n")
    if name.endswith(os.environ["SLOW_DNS_SUFFIX"]):
        time.sleep(float(os.environ["SLOW_DNS_SECONDS"]))
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    return _real(host, *args, **kwargs)


socket.getaddrinfo = getaddrinfo
'''


@pytest.fixture
def slow_dns(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    site = tmp_path / "slow-dns"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "lookups.log"
    log.touch()
    yield {"PYTHONPATH": f"{site}:{ROOT}", "SLOW_DNS_LOG": str(log), "SLOW_DNS_SUFFIX": SLOW,
           "SLOW_DNS_SECONDS": str(HANG_SECONDS)}, log


def lookups(log: Path) -> list[str]:
    return log.read_text().split()


def hold_tunnels(sc: SidecarProcess) -> tuple[list[threading.Thread], list[bytes]]:
    """TUNNELS clients asking for names whose lookups hang; each waits for its answer."""
    answers: list[bytes] = []

    def one(i: int) -> None:
        with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=HANG_SECONDS * 3) as c:
            c.sendall(f"CONNECT host{i}{SLOW}:443 HTTP/1.1\r\nHost: host{i}{SLOW}:443\r\n\r\n".encode())
            answers.append(read_until_closed(c))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(TUNNELS)]
    for t in threads:
        t.start()
    return threads, answers


def test_slow_lookups_for_other_names_never_reach_a_token_call_through_the_pair(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], slow_dns: tuple[dict[str, str], Path]
) -> None:
    env, log = slow_dns
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2,127.0.0.3", **env})
    assert wait_until(sc.egress_discovered, timeout=15)
    threads, answers = hold_tunnels(sc)
    assert wait_until(lambda: sum(n.endswith(SLOW) for n in lookups(log)) >= 4, timeout=10), lookups(log)
    with sc.session() as s:
        resp = redeem(s, world.salesforce.issue_refresh_token())
    assert resp.status_code == 200, resp.text
    status = sc.status()
    assert status["ready"] is True, status
    assert all(m["up"] is not False for m in status["pair"]), status["pair"]
    assert metric_value(sc.metrics(), "egress_sidecar_member_failures_total") == 0
    for t in threads:
        t.join(timeout=HANG_SECONDS * 3)
    # The tunnels get a clear answer of their own; the members were never looked up (IP literals).
    assert len(answers) == TUNNELS and all(a.startswith(b"HTTP/1.1 502") for a in answers), answers
    member_hosts = {m.split(":")[0] for m in world.members}
    assert not member_hosts & set(lookups(log)), lookups(log)


@pytest.fixture
def origin(test_ca: TestCA) -> Iterator[ScriptedOrigin]:
    with ScriptedOrigin(test_ca.issue(["localhost"], "slow-dns-origin"), ok) as server:
        yield server


def test_slow_lookups_for_other_names_never_reach_a_direct_token_call(
    make_sidecar_proc: Callable[..., SidecarProcess], origin: ScriptedOrigin, slow_dns: tuple[dict[str, str], Path]
) -> None:
    """Direct mode: the token host itself is looked up, on the token calls' own resolver."""
    env, log = slow_dns
    sc = make_sidecar_proc({"SIDECAR_TOKEN_HOSTS": "localhost", **env})
    threads, answers = hold_tunnels(sc)
    assert wait_until(lambda: sum(n.endswith(SLOW) for n in lookups(log)) >= 4, timeout=10), lookups(log)
    with sc.session() as s:
        resp = redeem(s, "5Aep861SLOW", url=f"https://localhost:{origin.address[1]}/services/oauth2/token")
    assert resp.status_code == 200, resp.text
    assert "localhost" in lookups(log)
    for t in threads:
        t.join(timeout=HANG_SECONDS * 3)
    assert len(answers) == TUNNELS


# -- the resolver itself ----------------------------------------------------------------------------
@pytest.mark.parametrize("host,family,address", [
    ("127.0.0.2", socket.AF_INET, "127.0.0.2"), ("127.1", socket.AF_INET, "127.0.0.1"),
    ("[::1]", socket.AF_INET6, "::1"), ("::ffff:127.0.0.3", socket.AF_INET, "127.0.0.3"),
])
def test_an_ip_literal_is_never_looked_up(monkeypatch: pytest.MonkeyPatch, host: str, family: int,
                                          address: str) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"getaddrinfo{args} was called")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    ((fam, _, _, addr),) = asyncio.run(Resolver("t", 1).getaddrinfo(host, 443))
    assert (fam, addr[0], addr[1]) == (family, address, 443)
    assert numeric_infos("login.salesforce.com", 443) is None

    async def connect() -> None:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            sock = await open_tcp("127.0.0.1", server.getsockname()[1])
            sock.close()
            with pytest.raises(LookupFailed):  # a name without a resolver: never the default executor
                await open_tcp("localhost", server.getsockname()[1])

    asyncio.run(connect())


def test_lookups_are_bounded_in_number_and_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most max_lookups threads are ever in getaddrinfo; a lookup past its deadline fails at once
    with a reason, while its thread (which libc will not interrupt) keeps its slot until it returns."""
    release = threading.Event()
    inside: list[int] = []
    most = [0]
    lock = threading.Lock()

    def hang(host: str, port: int, *args: object, **kwargs: object) -> list[object]:
        with lock:
            inside.append(1)
            most[0] = max(most[0], len(inside))
        release.wait(10)
        with lock:
            inside.pop()
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.9", port))]

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    resolver = Resolver("t", 2, timeout=0.3)

    async def run() -> tuple[list[object], int, object]:
        results = await asyncio.gather(*(resolver.getaddrinfo(f"n{i}.example", 443) for i in range(6)),
                                       return_exceptions=True)
        running = resolver.running
        release.set()
        for _ in range(100):  # bounded: the hung threads return and give their slots back
            if resolver.running == 0:
                break
            await asyncio.sleep(0.05)
        return results, running, await resolver.getaddrinfo("after.example", 443)

    results, running, after = asyncio.run(run())
    assert all(isinstance(r, LookupFailed) for r in results), results
    assert sum("took longer" in str(r) for r in results) == 2  # the two that got a thread
    assert sum("under way" in str(r) for r in results) == 4  # the rest never got one
    assert most[0] == 2 and running == 2
    assert after == [(socket.AF_INET, socket.SOCK_STREAM, 6, ("127.0.0.9", 443))]


def test_a_member_named_by_a_name_is_looked_up_once_at_start() -> None:
    """Token calls and probes connect to members without a lookup, so SIDECAR_PAIR's names become IP
    literals at start, and one that does not resolve fails at start naming the setting."""
    upstream = {"QUOTAGUARDSTATIC_URL": "http://u:p@127.0.0.2:9293"}
    pair = build_pair(load_settings({**upstream, "SIDECAR_PAIR": "localhost:9293,127.0.0.3:9293",
                                     "SIDECAR_EGRESS_IPS": "localhost:9293=52.1.2.3"}))
    assert [numeric_infos(m.address.host, 9293) is not None for m in pair.members] == [True, True]
    assert pair.members[0].address.host in ("127.0.0.1", "::1") and pair.members[0].pinned_ip == "52.1.2.3"
    with pytest.raises(ConfigError, match="SIDECAR_PAIR: cannot resolve member 'nowhere.invalid'"):
        build_pair(load_settings({**upstream, "SIDECAR_PAIR": "nowhere.invalid:9293"}))


def test_nothing_the_sidecar_opens_to_an_ip_literal_is_looked_up(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], slow_dns: tuple[dict[str, str], Path],
    redis_server: Callable[[], RedisServer],
) -> None:
    """Issue 22 item 5, on every way the real sidecar opens a connection, in its own process (every
    ``getaddrinfo`` it makes is logged): the prober and the IP echo through each member, a token call
    through the pair with its connection's egress verified and the rotation shield on Redis
    (``redis://127.0.0.1``), the pool's direct connections for a tunnel and a plain request to IP literals
    (one in a shorthand form): none is looked up. The names the members resolve (Salesforce, the echo)
    are never looked up here either."""
    env, log = slow_dns
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    redis = redis_server()
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2,127.0.0.3", "SIDECAR_REDIS_URL": redis.url,
                            "SIDECAR_REDIS_KEY": REDIS_KEY, **env})
    assert wait_until(sc.egress_discovered, timeout=15)
    with sc.session() as s:
        assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200
        echo_host, echo_port = world.echo.address
        plain = s.get(f"http://{echo_host}:{echo_port}/", timeout=10)  # absolute form, forwarded direct
        assert plain.status_code == 200, plain.text
    for target in (f"{echo_host}:{echo_port}", f"127.1:{echo_port}"):  # a tunnel, direct
        with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
            c.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            assert c.recv(64).startswith(b"HTTP/1.1 200"), target
    assert metric_value(sc.metrics(), "egress_sidecar_redis_up") == 1
    looked_up = lookups(log)
    assert [h for h in looked_up if parse_ip(h) is not None] == [], looked_up
    assert not {SF_HOST, ECHO_HOST, *(m.split(":")[0] for m in world.members)} & set(looked_up), looked_up
