"""End-to-end harness: the real sidecar as a subprocess, in front of the simulated pair and Salesforce.

Everything listens on loopback. Each pair member has its own address (127.0.0.2, 127.0.0.3, ...) and
connects out from it, so the fake Salesforce sees a different source IP per member, as in production.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.sim.echo import FakeIPEcho
from sidecar.sim.quotaguard import FakeQuotaGuardPair
from sidecar.sim.salesforce import FakeSalesforce

SF_HOST = "login.salesforce.com"
ECHO_HOST = "ip.quotaguard.com"
TOKEN_URL = f"https://{SF_HOST}/services/oauth2/token"
CLIENT_ID = "3MVG9demo"
CLIENT_SECRET = "demo-consumer-secret-0123456789"
PROXY_USER, PROXY_PASS = "qgUser", "qgPass-s3cret-XYZ"
ROOT = Path(__file__).resolve().parents[1]


def find_tool(names: tuple[str, ...], env_var: str) -> str | None:
    """A tool's path: ``$env_var`` if set (and a file), else the first of ``names`` on PATH."""
    explicit = os.environ.get(env_var)
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return next((p for p in map(shutil.which, names) if p), None)


def require_tool(names: tuple[str, ...], env_var: str, install_hint: str) -> str:
    """The tool's path, or skip the calling test on a developer machine and fail it in CI (CI must
    install every real part the tests use)."""
    path = find_tool(names, env_var)
    if path:
        return path
    message = f"{names[0]} not found on PATH (or ${env_var}): {install_hint}"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI is set but {message}", pytrace=False)
    pytest.skip(message)


def settled(fetch: Callable[[], str], pause: float = 0.03, tries: int = 30) -> str:
    """``fetch()`` until two reads ``pause`` apart agree: the sidecar records a token call just after it
    has answered the app, so a test that reads right after its call must not race that record."""
    before = fetch()
    for _ in range(tries):
        time.sleep(pause)
        now = fetch()
        if now == before:
            return now
        before = now
    return before


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    """Poll ``url`` until it answers 200 (None), the process exits, or ``timeout`` passes (what went wrong)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return None
        except OSError:
            pass
        time.sleep(0.1)
    return f"not ready within {timeout}s"


def read_until_closed(sock: socket.socket, limit: int = 100) -> bytes:
    """Everything the peer sends until it closes (at most ``limit`` reads)."""
    data = b""
    for _ in range(limit):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class World:
    """The simulated outside world: Salesforce, the IP echo and the QuotaGuard pair."""

    salesforce: FakeSalesforce
    echo: FakeIPEcho
    pair: FakeQuotaGuardPair

    @property
    def members(self) -> list[str]:
        return [f"{m.address[0]}:{m.address[1]}" for m in self.pair.members]

    @property
    def upstream_url(self) -> str:
        host, port = self.pair.members[0].address
        return f"http://{PROXY_USER}:{PROXY_PASS}@{host}:{port}"

    def pair_env(self) -> dict[str, str]:
        return {
            "QUOTAGUARDSTATIC_URL": self.upstream_url,
            "SIDECAR_PAIR": ",".join(self.members),
            "SIDECAR_ECHO_URL": f"http://{ECHO_HOST}/",
        }


def start_world(cert: tuple[Path, Path], allowlist: tuple[str, ...], n_members: int = 2) -> World:
    sf = FakeSalesforce(*cert, allowlist=allowlist, client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
    echo = FakeIPEcho().start()
    hosts = tuple(f"127.0.0.{i + 2}" for i in range(n_members))
    pair = FakeQuotaGuardPair(
        hosts,
        username=PROXY_USER,
        password=PROXY_PASS,
        routes={(SF_HOST, 443): sf.address, (ECHO_HOST, 80): echo.address},
    )
    try:
        pair.start()
    except BaseException:
        sf.stop()
        echo.stop()
        raise
    return World(sf, echo, pair)


def stop_world(world: World) -> None:
    world.pair.stop()
    world.echo.stop()
    world.salesforce.stop()


@dataclass
class SidecarProcess:
    env: dict[str, str]
    confdir: Path
    log_path: Path
    proxy_port: int
    admin_port: int
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)
    _start_offset: int = field(default=0, repr=False)

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def ca_bundle(self) -> Path:
        return self.confdir / "ca-bundle.pem"

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> SidecarProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._start_offset = self.log_path.stat().st_size  # this run's lines come after it (a restart appends)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        problem = self._learn_ports(timeout)
        path = "/readyz" if wait_ready else "/healthz"
        if problem is None:
            problem = wait_http_ok(self.admin_url + path, self.proc, max(1.0, deadline - time.monotonic()))
        if problem is None:
            return self
        self.stop()
        raise RuntimeError(f"sidecar {problem}:\n{self.log_text()}")

    def _learn_ports(self, timeout: float) -> str | None:
        """The ports the sidecar listens on, from its start-up line (it binds port 0 unless the test named one:
        no port is picked ahead and then taken by someone else meanwhile); None, or what went wrong."""
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            for rec in self._records():
                if rec.get("proxy") and rec.get("admin"):
                    self.proxy_port = int(str(rec["proxy"]).rsplit(":", 1)[1])
                    self.admin_port = int(str(rec["admin"]).rsplit(":", 1)[1])
                    return None
            if self.proc.poll() is not None:
                return f"exited with {self.proc.returncode}"
            time.sleep(0.05)
        return f"not listening within {timeout}s"

    def _records(self) -> list[dict[str, Any]]:
        with open(self.log_path, "rb") as f:
            f.seek(self._start_offset)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._log:
            self._log.close()
        return self.proc.returncode

    def log_text(self) -> str:
        if self.proc is not None and self.proc.poll() is None:  # a running sidecar writes its waiting records now
            with contextlib.suppress(OSError):
                urllib.request.urlopen(self.admin_url + "/metrics", timeout=5).close()
        return settled(lambda: self.log_path.read_text(errors="replace") if self.log_path.exists() else "")

    def log_events(self, kind: str = "token_call") -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == kind:
                out.append(rec)
        return out

    def metrics(self) -> str:
        def fetch() -> str:
            with urllib.request.urlopen(self.admin_url + "/metrics", timeout=5) as resp:
                return resp.read().decode()

        return settled(fetch)

    def egress_discovered(self) -> bool:
        """Every pair member's egress IP is known (after the first probe round)."""
        return all(m["egress_ip"] for m in self.status()["pair"])

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.admin_url + "/status", timeout=5) as resp:
            return json.loads(resp.read())

    def session(self) -> requests.Session:
        """A requests session configured exactly as HTTPS_PROXY + REQUESTS_CA_BUNDLE would."""
        s = requests.Session()
        s.trust_env = False  # the test machine's own proxy settings must not interfere
        s.proxies = {"https": self.proxy_url, "http": self.proxy_url}
        s.verify = str(self.ca_bundle)
        return s

    def client_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update(
            HTTPS_PROXY=self.proxy_url,
            https_proxy=self.proxy_url,
            NO_PROXY="",
            REQUESTS_CA_BUNDLE=str(self.ca_bundle),
            SSL_CERT_FILE=str(self.ca_bundle),
            CURL_CA_BUNDLE=str(self.ca_bundle),
            NODE_EXTRA_CA_CERTS=str(self.confdir / "ca.pem"),
        )
        return env


def sidecar_env(tmp: Path, upstream_ca: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not (k.startswith("SIDECAR_") or k == "QUOTAGUARDSTATIC_URL")}
    env = {k: v for k, v in env.items() if not k.lower().endswith("_proxy")}
    env.update(
        SIDECAR_CONFDIR=str(tmp / "confdir"),
        SIDECAR_UPSTREAM_CA=str(upstream_ca),
        SIDECAR_LOG_FORMAT="json",
        SIDECAR_PROBE_INTERVAL="1",
        SIDECAR_CONNECT_TIMEOUT="3",
        PYTHONPATH=str(ROOT),
        # Never the fixed defaults (3128, 9464): a test must not depend on, or collide with, what else runs.
        SIDECAR_LISTEN="127.0.0.1:0",
        SIDECAR_ADMIN_LISTEN="127.0.0.1:0",
    )
    env.update(extra)
    return env


def make_sidecar(tmp: Path, upstream_ca: Path, extra: dict[str, str]) -> SidecarProcess:
    """A sidecar process to start; it listens on ports the kernel picks (SIDECAR_LISTEN and
    SIDECAR_ADMIN_LISTEN port 0, unless ``extra`` names them), learnt from its start-up line."""
    env = sidecar_env(tmp, upstream_ca, extra)
    return SidecarProcess(env=env, confdir=tmp / "confdir", log_path=tmp / "sidecar.log", proxy_port=0, admin_port=0)


def redeem_in_background(sc: SidecarProcess, world: World) -> tuple[threading.Thread, dict[str, object]]:
    """A refresh through ``sc`` on a thread of its own (started): its status (or error) lands in the dict."""
    result: dict[str, object] = {}

    def call() -> None:
        with sc.session() as s:
            try:
                result["status"] = redeem(s, world.salesforce.issue_refresh_token()).status_code
            except Exception as exc:  # noqa: BLE001 - the caller asserts on it
                result["error"] = repr(exc)

    thread = threading.Thread(target=call)
    thread.start()
    return thread, result


def refresh_form(token: str) -> str:
    """The form body of a refresh redemption of the test app, for tests that write the request themselves."""
    return f"grant_type=refresh_token&refresh_token={token}&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}"


def redeem(session: requests.Session, refresh_token: str, url: str = TOKEN_URL) -> requests.Response:
    return session.post(
        url,
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
        timeout=15,
    )


def redeem_chain(sc: SidecarProcess, salesforce: FakeSalesforce, n: int) -> None:
    """``n`` consecutive refreshes of one grant through the sidecar, saving each rotated token first as a
    correct app does; every one must succeed."""
    token = salesforce.issue_refresh_token()
    with sc.session() as s:
        for _ in range(n):
            resp = redeem(s, token)
            assert resp.status_code == 200, resp.text
            token = resp.json()["refresh_token"]


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def iter_written_files(root: Path) -> Iterator[Path]:
    for p in root.rglob("*"):
        if p.is_file():
            yield p
