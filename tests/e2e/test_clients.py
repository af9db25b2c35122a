"""The client matrix: each client of docs/clients.md refreshes through the real sidecar, set up as its row says.

Every client redeems a refresh token (the fake Salesforce rotates it) and makes one REST call
(GET /services/data/ on the instance the token answer names, the same token host), with nothing in
its environment but the proxy variables and its row's settings, read from docs/clients.md itself. The
sidecar runs with SIDECAR_ROUTE=salesforce, so both calls leave through a pair member and no DNS
lookup of login.salesforce.com is ever made. Node and Java clients need tests/clients/setup.sh.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.ops.trust import client_env
from sidecar.sim.certs import TestCA
from sidecar.sim.salesforce import FakeSalesforce
from tests.clients.helpers import (
    CLIENTS,
    SETUP_HINT,
    ConnectionCounter,
    java,
    node,
    run_client,
    sf_env,
)
from tests.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    ROOT,
    TOKEN_URL,
    SidecarProcess,
    World,
    make_sidecar,
    require_tool,
    start_world,
    stop_world,
)

DOC = ROOT / "docs" / "clients.md"
EXAMPLE_DIR, EXAMPLE_PROXY = "/var/lib/egress-sidecar", "127.0.0.1:3128"
PAIR_IPS = {"127.0.0.2", "127.0.0.3"}
# Set by the test machine or an earlier test, never by a row: stripped before a row's settings apply.
CLIENT_SETTINGS = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
                   "NODE_USE_ENV_PROXY", "NODE_OPTIONS", "JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS")


# ---- what docs/clients.md says ----------------------------------------------------------------
def _assignments(text: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(text) if re.match(r"^[A-Za-z_]+=", word))


def _section(doc: str, title: str) -> str:
    return doc.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _fenced(section: str) -> str:
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


@dataclass(frozen=True)
class Docs:
    common: dict[str, str]  # the proxy variables every app sets
    rows: dict[str, dict[str, str]]  # test id -> the row's settings

    def env_for(self, test_id: str) -> dict[str, str]:
        return {**self.common, **self.rows[test_id]}


def read_docs(trust_dir: str = EXAMPLE_DIR, proxy: str = EXAMPLE_PROXY) -> Docs:
    """docs/clients.md with its example paths and proxy replaced by the given ones."""
    host, port = proxy.rsplit(":", 1)
    doc = DOC.read_text().replace(EXAMPLE_DIR, trust_dir).replace(EXAMPLE_PROXY, proxy)
    doc = doc.replace("proxyHost=127.0.0.1", f"proxyHost={host}").replace("proxyPort=3128", f"proxyPort={port}")
    common = _assignments(_fenced(_section(doc, "Every app")))
    named = _assignments(_fenced(_section(doc, "Java")))  # values a row names as "`NAME` (below)"
    rows = {}
    for line in _section(doc, "Per client").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[4].startswith("`"):
            continue
        settings: dict[str, str] = {}
        for span in re.findall(r"`([^`]+)`", cells[1]):
            settings.update(_assignments(span) if "=" in span else {span: named[span]})
        rows[cells[4].strip("`")] = settings
    return Docs(common, rows)


# ---- the world, one sidecar for the whole matrix ------------------------------------------------
@dataclass
class Matrix:
    world: World
    sc: SidecarProcess
    docs: Docs

    def base_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k not in CLIENT_SETTINGS}

    def env(self, test_id: str, refresh_token: str) -> dict[str, str]:
        return {**self.base_env(), **self.docs.env_for(test_id), **sf_env(refresh_token)}


@pytest.fixture(scope="module")
def matrix(sf_cert: tuple[Path, Path], test_ca: TestCA,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    world = start_world(sf_cert, tuple(sorted(PAIR_IPS)))
    sc = make_sidecar(tmp_path_factory.mktemp("matrix"), test_ca.ca_path,
                      {**world.pair_env(), "SIDECAR_ROUTE": "salesforce"})
    try:
        sc.start()
        yield Matrix(world, sc, read_docs(str(sc.confdir), f"127.0.0.1:{sc.proxy_port}"))
    finally:
        sc.stop()
        stop_world(world)


def assert_refreshed_through_pair(m: Matrix, old_token: str, result: dict[str, object], calls_before: int) -> None:
    sf = m.world.salesforce
    assert result["token_status"] == 200, result
    new_token = result["refresh_token"]
    assert isinstance(new_token, str) and new_token != old_token, "no rotated refresh token came back"
    assert sf.refresh_token_valid(new_token) and not sf.refresh_token_valid(old_token)
    assert result["rest_status"] == 200 and result["api_versions"] == 3, result
    seen = [(r.path, r.grant_type, r.source_ip) for r in sf.seen]
    expected = [("/services/oauth2/token", "refresh_token"), ("/services/data/", None)]
    assert [(p, g) for p, g, _ in seen] == expected, seen
    assert {ip for *_, ip in seen} <= PAIR_IPS, f"Salesforce saw a call that did not leave through the pair: {seen}"
    calls = m.sc.log_events()
    assert len(calls) == calls_before + 1, "the sidecar did not record exactly one token call"
    assert calls[-1]["outcome"] == "success" and calls[-1]["grant_type"] == "refresh_token"
    assert calls[-1]["member"] in m.world.members


def node_version() -> tuple[int, int]:
    out = subprocess.run([node(), "--version"], capture_output=True, text=True, timeout=30, check=True)
    major, minor = out.stdout.strip().lstrip("v").split(".")[:2]
    return int(major), int(minor)


def node_takes_env_proxy(version: tuple[int, int]) -> bool:
    """NODE_USE_ENV_PROXY exists from Node 22.21 and 24."""
    return version >= (24, 0) or (version[0] == 22 and version[1] >= 21)


COMMANDS: dict[str, Callable[[], list[str]]] = {
    "requests": lambda: [sys.executable, "python/requests_app.py"],
    "httpx": lambda: [sys.executable, "python/httpx_app.py"],
    "httpx-async": lambda: [sys.executable, "python/httpx_async_app.py"],
    "aiohttp": lambda: [sys.executable, "python/aiohttp_app.py"],
    "urllib": lambda: [sys.executable, "python/urllib_app.py"],
    "node-fetch": lambda: [node(), "node/node_fetch.mjs"],
    "undici": lambda: [node(), "node/undici_env.mjs"],
    "axios": lambda: [node(), "node/axios_app.mjs"],
    "native-fetch-dispatcher": lambda: [node(), "node/native_fetch_dispatcher.mjs"],
    "java": lambda: [java(), "java/SalesforceRefresh.java"],
    "java-urlconnection": lambda: [java(), "java/SalesforceRefreshUrlConnection.java"],
}


def test_every_row_of_the_docs_is_a_test() -> None:
    rows = read_docs().rows
    assert set(rows) == {*COMMANDS, "curl", "native-fetch-env"}, "docs/clients.md rows and tests differ"
    for test_id, settings in rows.items():
        assert settings, f"row {test_id} sets nothing"
        for name, value in settings.items():
            paths = re.findall(r"[^\s=]*\.(?:pem|p12)\b", value)
            assert all(p.startswith("/") for p in paths), f"{test_id}: {name} gives a path that is not absolute"


def test_the_docs_say_what_the_sidecar_logs() -> None:
    """The lines a user copies from docs/clients.md are the ones the sidecar logs and exec sets."""
    docs = read_docs()
    logged = client_env(Path(EXAMPLE_DIR), f"http://{EXAMPLE_PROXY}")
    for test_id, settings in docs.rows.items():
        for name, value in {**docs.common, **settings}.items():
            assert logged[name] == value, (test_id, name)


@pytest.mark.parametrize("test_id", sorted(COMMANDS))
def test_client(matrix: Matrix, test_id: str) -> None:
    argv = COMMANDS[test_id]()
    token = matrix.world.salesforce.issue_refresh_token()
    matrix.world.salesforce.reset_seen()
    before = len(matrix.sc.log_events())
    result = run_client(argv, matrix.env(test_id, token))
    assert_refreshed_through_pair(matrix, token, result, before)


def test_curl(matrix: Matrix) -> None:
    curl = require_tool(("curl",), "CURL", SETUP_HINT)
    token = matrix.world.salesforce.issue_refresh_token()
    matrix.world.salesforce.reset_seen()
    before = len(matrix.sc.log_events())
    env = matrix.env("curl", token)
    # --data-urlencode: a form body with a Content-Length, as `curl -d` sends it.
    form = [arg for k, v in (("grant_type", "refresh_token"), ("refresh_token", token), ("client_id", CLIENT_ID),
                             ("client_secret", CLIENT_SECRET)) for arg in ("--data-urlencode", f"{k}={v}")]
    fmt = ["-w", "\n%{http_code}"]
    t = subprocess.run([curl, "-sS", "--max-time", "15", *fmt, *form, TOKEN_URL], env=env, capture_output=True,
                       text=True, timeout=30)
    assert t.returncode == 0, t.stderr
    body, status = t.stdout.rsplit("\n", 1)
    answer = json.loads(body) if status == "200" else {}
    bearer = ["-H", f"Authorization: Bearer {answer.get('access_token')}"]
    r = subprocess.run([curl, "-sS", "--max-time", "15", *fmt, *bearer, f"{answer.get('instance_url')}/services/data/"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    rest_body, rest_status = r.stdout.rsplit("\n", 1)
    result = {"token_status": int(status), "refresh_token": answer.get("refresh_token"),
              "rest_status": int(rest_status), "api_versions": len(json.loads(rest_body))}
    assert_refreshed_through_pair(matrix, token, result, before)


def test_native_fetch_env(matrix: Matrix, sf_cert: tuple[Path, Path], test_ca: TestCA) -> None:
    """NODE_USE_ENV_PROXY=1: on Node 22.21+/24+ the built-in fetch refreshes through the sidecar with no
    code at all; on older Node (20 here) it goes direct, silently, and the docs say so."""
    version = node_version()
    if node_takes_env_proxy(version):
        token = matrix.world.salesforce.issue_refresh_token()
        matrix.world.salesforce.reset_seen()
        before = len(matrix.sc.log_events())
        result = run_client([node(), "node/native_fetch.mjs"], matrix.env("native-fetch-env", token))
        assert_refreshed_through_pair(matrix, token, result, before)
        return
    # Node < 22.21: the proxy is a listener that must stay unused; the target is a Salesforce on
    # loopback that this process can reach directly (nothing may leave the machine).
    local_sf = FakeSalesforce(*sf_cert, allowlist=("127.0.0.1",), client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    with local_sf as sf, ConnectionCounter() as proxy:
        url = f"https://localhost:{sf.address[1]}/services/oauth2/token"
        documented = read_docs(proxy=proxy.url.removeprefix("http://")).env_for("native-fetch-env")
        env = {**matrix.base_env(), **documented, "NO_PROXY": "", "no_proxy": "",
               "NODE_EXTRA_CA_CERTS": str(test_ca.ca_path)}
        token = sf.issue_refresh_token()
        result = run_client([node(), "node/native_fetch.mjs"], {**env, **sf_env(token, url)})
        assert env["NODE_USE_ENV_PROXY"] == "1" and env["HTTPS_PROXY"] == proxy.url
        assert result["token_status"] == 200 and proxy.count == 0, "Node {}.{} fetch used the proxy".format(*version)
        assert {r.source_ip for r in sf.seen} == {"127.0.0.1"}, "it went direct, from this host's own IP"
        # The same environment with undici's EnvHttpProxyAgent as global dispatcher does use the proxy.
        out = subprocess.run([node(), "node/native_fetch_dispatcher.mjs"], cwd=CLIENTS, capture_output=True, text=True,
                             env={**env, **sf_env(sf.issue_refresh_token(), url)}, timeout=60)
        assert out.returncode != 0 and proxy.count >= 1, out.stdout + out.stderr


def test_a_stale_lower_case_proxy_wins_over_upper_case(matrix: Matrix) -> None:
    """The pitfall docs/clients.md warns about (hence both cases, everywhere): requests reads a stale
    https_proxy, not the HTTPS_PROXY beside it."""
    with ConnectionCounter() as stale:
        token = matrix.world.salesforce.issue_refresh_token()
        env = {**matrix.env("requests", token), "https_proxy": stale.url}
        out = subprocess.run([sys.executable, "python/requests_app.py"], env=env, cwd=CLIENTS, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode != 0 and stale.count >= 1, "the stale lower-case https_proxy was not used"
        assert matrix.world.salesforce.refresh_token_valid(token), "the refresh must not have reached Salesforce"
