"""Starting and stopping what is measured: the world process, Squid, plain mitmdump and the sidecar.

Every process is started by the bench on loopback with its files in the bench's temporary
directory, waited for with a deadline, and stopped with SIGTERM, then SIGKILL after a deadline.
A contender that cannot run here (Squid not installed, mitmdump missing) raises ``Unavailable``
with the reason, which the report prints instead of a number.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.harness import (
    ECHO_HOST,
    PROXY_PASS,
    PROXY_USER,
    ROOT,
    free_port,
    sidecar_env,
)

STOP_TIMEOUT = 10.0
SQUID = "/usr/sbin/squid"


class Unavailable(Exception):
    """This contender cannot be measured on this machine; the message says why."""


def proxy_auth_header(user: str = PROXY_USER, password: str = PROXY_PASS) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def stop_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def wait_port(addr: tuple[str, int], proc: subprocess.Popen[Any], timeout: float, what: str,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise Unavailable(f"{what} exited with {proc.returncode} at start: {tail.strip()[-600:]}")
        try:
            with socket.create_connection(addr, 0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise Unavailable(f"{what} did not listen on {addr[0]}:{addr[1]} within {timeout:g}s")


def proc_rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the world -----------------------------------------------------------------------------------

class WorldProcess:
    """``python -m bench.world``: fake Salesforce, the fake pair, the echo and the bulk server."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[str] | None = None
        self.info: dict[str, Any] = {}
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 30.0) -> WorldProcess:
        self._log = open(self.workdir / "world.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.world", str(self.workdir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=ROOT,
            env={**_clean_env(), "PYTHONPATH": str(ROOT)},
        )
        self.info = json.loads(self._readline(timeout))
        return self

    def _readline(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                raise RuntimeError(f"the world process did not answer within {timeout:g}s")
        finally:
            sel.close()
        line = self.proc.stdout.readline()
        if not line:
            log = (self.workdir / "world.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the world process exited: {log}")
        return line

    def tokens(self, n: int) -> list[str]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"tokens {n}\n")
        self.proc.stdin.flush()
        return list(json.loads(self._readline(30)))

    def reset(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write("reset\n")
        self.proc.stdin.flush()
        self._readline(30)

    @property
    def members(self) -> list[tuple[str, int]]:
        return [(h, p) for h, p in self.info["members"]]

    @property
    def salesforce(self) -> tuple[str, int]:
        h, p = self.info["salesforce"]
        return h, p

    @property
    def bulk(self) -> tuple[str, int]:
        h, p = self.info["bulk"]
        return h, p

    @property
    def ca(self) -> str:
        return str(self.info["ca"])

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(STOP_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            pass
        stop_process(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log:
            self._log.close()


def _clean_env() -> dict[str, str]:
    """The environment without proxy settings, so no contender is proxied by the machine's own."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


# ---- Squid ---------------------------------------------------------------------------------------

SQUID_CONF = """\
# egress-sidecar bench: Squid with the QuotaGuard pair as round-robin cache_peer parents.
http_port 127.0.0.1:{port}
pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log stdio:{dir}/access.log
cache_store_log none
netdb_filename none
coredump_dir {dir}
cache deny all
cache_mem 8 MB
shutdown_lifetime 1 seconds
visible_hostname egress-bench
max_filedescriptors 8192
# Never leave loopback, even for a DNS lookup (none is needed: parents take the token host).
dns_nameservers 127.0.0.1
{user_line}
acl token_host dstdomain {sf_host}
acl passthrough port {bulk_port}
http_access allow localhost
http_access deny all
cache_peer {m1_host} parent {m1_port} 0 no-query no-digest round-robin login={login} name=qg1
cache_peer {m2_host} parent {m2_port} 0 no-query no-digest round-robin login={login} name=qg2
cache_peer_access qg1 allow token_host
cache_peer_access qg1 deny all
cache_peer_access qg2 allow token_host
cache_peer_access qg2 deny all
always_direct allow passthrough
never_direct allow token_host
"""


@dataclass
class Squid:
    workdir: Path
    members: list[tuple[str, int]]
    sf_host: str
    bulk_port: int
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    version: str = ""

    def start(self, timeout: float = 15.0) -> Squid:
        if not os.path.exists(SQUID):
            raise Unavailable(f"{SQUID} not found (Debian package `squid`)")
        d = self.workdir / "squid"
        d.mkdir(exist_ok=True)
        user_line = ""
        if os.geteuid() == 0:  # Squid refuses to run as root; its own user must write the log dir
            user_line = "cache_effective_user proxy"
            d.chmod(0o777)
            self.workdir.chmod(self.workdir.stat().st_mode | 0o011)  # let it traverse, not list
        (m1h, m1p), (m2h, m2p) = self.members[:2]
        conf = SQUID_CONF.format(
            port=self.port, dir=d, user_line=user_line, sf_host=self.sf_host, bulk_port=self.bulk_port,
            m1_host=m1h, m1_port=m1p, m2_host=m2h, m2_port=m2p, login=f"{PROXY_USER}:{PROXY_PASS}",
        )
        (d / "squid.conf").write_text(conf)
        try:
            self.version = subprocess.run([SQUID, "-v"], check=False, capture_output=True, text=True, timeout=10
                                          ).stdout.splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            self.version = "squid (version unknown)"
        check = subprocess.run([SQUID, "-k", "parse", "-f", str(d / "squid.conf")], check=False, capture_output=True,
                               text=True, timeout=30)
        if check.returncode != 0:
            raise Unavailable(f"squid -k parse failed: {(check.stderr or check.stdout).strip()[-400:]}")
        log = d / "stderr.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([SQUID, "-N", "-f", str(d / "squid.conf")], stdout=out,
                                         stderr=subprocess.STDOUT, env=_clean_env())
        try:
            wait_port(("127.0.0.1", self.port), self.proc, timeout, "squid", d / "cache.log")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)


# ---- plain mitmdump ------------------------------------------------------------------------------

@dataclass
class Mitmdump:
    workdir: Path
    member: tuple[str, int]
    upstream_ca: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def confdir(self) -> Path:
        return self.workdir / "mitmdump"

    @property
    def ca_file(self) -> str:
        return str(self.confdir / "mitmproxy-ca-cert.pem")

    def start(self, timeout: float = 30.0) -> Mitmdump:
        exe = Path(sys.executable).parent / "mitmdump"
        if not exe.exists():
            found = shutil.which("mitmdump")
            if not found:
                raise Unavailable("mitmdump not found next to this Python nor on PATH")
            exe = Path(found)
        self.confdir.mkdir(exist_ok=True)
        log = self.workdir / "mitmdump.log"
        host, port = self.member
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(exe), "-q", "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
                 "--mode", f"upstream:http://{host}:{port}", "--upstream-auth", f"{PROXY_USER}:{PROXY_PASS}",
                 "--set", f"confdir={self.confdir}", "--set", f"ssl_verify_upstream_trusted_ca={self.upstream_ca}"],
                stdout=out, stderr=subprocess.STDOUT, env=_clean_env(),
            )
        try:
            wait_port(("127.0.0.1", self.port), self.proc, timeout, "mitmdump", log)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_process(self.proc)


# ---- the sidecar ---------------------------------------------------------------------------------

@dataclass
class Sidecar:
    """``python -m sidecar run`` with the tests' environment (tests.harness.sidecar_env) and the pair.

    ``module`` lets the profile run use ``bench.profiled_sidecar`` instead of ``sidecar``.
    """

    base: Path
    upstream_ca: str
    members: list[tuple[str, int]]
    module: str = "sidecar"
    extra_env: dict[str, str] = field(default_factory=dict)
    proxy_port: int = 0
    admin_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    started_s: float = 0.0  # Popen to /readyz 200
    _log: IO[bytes] | None = None

    @property
    def confdir(self) -> Path:
        return self.base / "confdir"

    @property
    def log_path(self) -> Path:
        return self.base / "sidecar.log"

    @property
    def ca_file(self) -> str:
        return str(self.confdir / "ca.pem")

    def env(self) -> dict[str, str]:
        (h1, p1) = self.members[0]
        env = sidecar_env(self.base, Path(self.upstream_ca), {
            "QUOTAGUARDSTATIC_URL": f"http://{PROXY_USER}:{PROXY_PASS}@{h1}:{p1}",
            "SIDECAR_PAIR": ",".join(f"{h}:{p}" for h, p in self.members),
            "SIDECAR_ECHO_URL": f"http://{ECHO_HOST}/",
            # Production-like: both members allowlisted, the guard enforcing, probes at their default
            # interval (the tests probe every second; here a probe would land inside a measurement).
            "SIDECAR_ALLOWLIST": ",".join(h for h, _ in self.members),
            "SIDECAR_PROBE_INTERVAL": "60",
            "SIDECAR_LISTEN": f"127.0.0.1:{self.proxy_port}",
            "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
        })
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30.0) -> Sidecar:
        """Start and wait for /readyz 200 (polled every 10 ms); ``started_s`` is the time it took."""
        self.base.mkdir(parents=True, exist_ok=True)
        self.proxy_port, self.admin_port = free_port(), free_port()
        env = self.env()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, "run"], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=ROOT)
        url = f"http://127.0.0.1:{self.admin_port}/readyz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"the sidecar exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        self.started_s = time.perf_counter() - t0
                        return self
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.01)
        self.stop()
        raise Unavailable(f"the sidecar was not ready within {timeout:g}s: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-1500:] if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)
        if self._log:
            self._log.close()
            self._log = None

    def token_durations_ms(self) -> list[float]:
        """``duration_ms`` of every token call the sidecar logged (its own view of each call)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "token_call" and isinstance(rec.get("duration_ms"), (int, float)):
                out.append(float(rec["duration_ms"]))
        return out
