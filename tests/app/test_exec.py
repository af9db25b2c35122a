"""`egress-sidecar exec -- COMMAND`: the Heroku-style wrapper, with a real child and real signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from sidecar.sim.certs import TestCA
from tests.clients.helpers import JAVA_CLIENT, ConnectionCounter, java, sf_env
from tests.harness import CLIENT_SECRET, ROOT, TOKEN_URL, World, free_port, sidecar_env

CHILD_TOKEN_CALL = f"""
import os, sys, requests
assert os.environ["HTTPS_PROXY"].startswith("http://127.0.0.1:")
for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
    assert os.path.exists(os.environ[name]), name
assert "127.0.0.1" in os.environ["NO_PROXY"]
r = requests.post({TOKEN_URL!r}, data={{"grant_type": "refresh_token", "refresh_token": sys.argv[1],
                  "client_id": "3MVG9demo", "client_secret": {CLIENT_SECRET!r}}}, timeout=10)
print("status", r.status_code, flush=True)
sys.exit(7)
"""

CHILD_WAITS_FOR_TERM = """
import signal, sys, time
def bye(signum, frame):
    print("got", signum, flush=True)
    sys.exit(42)
signal.signal(signal.SIGTERM, bye)
print("ready", flush=True)
for _ in range(300):
    time.sleep(0.1)
sys.exit(3)
"""


def wrapper_env(world: World, tmp_path: Path, test_ca: TestCA) -> dict[str, str]:
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    return sidecar_env(tmp_path, test_ca.ca_path, {
        **world.pair_env(),
        "SIDECAR_LISTEN": f"127.0.0.1:{free_port()}",
        "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
    })


def test_exec_runs_child_through_sidecar_and_returns_its_code(world: World, tmp_path: Path, test_ca: TestCA) -> None:
    token = world.salesforce.issue_refresh_token()
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "exec", "--", sys.executable, "-c", CHILD_TOKEN_CALL, token],
        env=wrapper_env(world, tmp_path, test_ca), capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert out.returncode == 7, out.stdout + out.stderr
    assert "status 200" in out.stdout
    assert [r.source_ip for r in world.salesforce.seen] in (["127.0.0.2"], ["127.0.0.3"])
    assert '"event":"token_call"' in out.stderr


def test_exec_warns_about_a_salesforce_domain_in_no_proxy(world: World, tmp_path: Path, test_ca: TestCA) -> None:
    """exec leaves the Salesforce entries out of the command's NO_PROXY, so the command reaches Salesforce
    through the sidecar, and keeps the app's other entries (an internal service stays direct); the NO_PROXY it
    was started with sends anything started without exec around the sidecar: exec says so."""
    env = {**wrapper_env(world, tmp_path, test_ca),
           "NO_PROXY": "localhost,.force.com,.svc.cluster.local,login.salesforce.com", "no_proxy": "internal-api,*"}
    child = "import os; print('child no_proxy', os.environ['NO_PROXY'], os.environ['no_proxy'])"
    out = subprocess.run([sys.executable, "-m", "sidecar", "exec", "--", sys.executable, "-c", child],
                         env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    kept = "localhost,127.0.0.1,::1,.svc.cluster.local,internal-api"
    assert f"child no_proxy {kept} {kept}" in out.stdout
    (warning,) = [json.loads(line) for line in out.stderr.splitlines() if "NO_PROXY lists" in line]
    assert warning["level"] == "warning" and warning["msg"].startswith("NO_PROXY lists .force.com, login.salesforce.com")
    assert "egress-sidecar exec leaves the Salesforce entries out" in warning["msg"]
    (lower,) = [json.loads(line) for line in out.stderr.splitlines() if "no_proxy lists" in line]
    assert lower["msg"].startswith("no_proxy lists *:")


def test_exec_forwards_sigterm(world: World, tmp_path: Path, test_ca: TestCA) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "exec", "--", sys.executable, "-c", CHILD_WAITS_FOR_TERM],
        env=wrapper_env(world, tmp_path, test_ca), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline and "ready" not in line:
            line = proc.stdout.readline()
        assert "ready" in line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 42
        assert f"got {int(signal.SIGTERM)}" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_exec_missing_command(tmp_path: Path, test_ca: TestCA) -> None:
    env = sidecar_env(tmp_path, test_ca.ca_path, {"SIDECAR_LISTEN": f"127.0.0.1:{free_port()}",
                                                  "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{free_port()}"})
    out = subprocess.run([sys.executable, "-m", "sidecar", "exec", "--", "no-such-command-xyz"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 127 and "command not found: no-such-command-xyz" in out.stderr
    none = subprocess.run([sys.executable, "-m", "sidecar", "exec"], env=env, capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert none.returncode == 2 and "give the command" in none.stderr


CHILD_PRINTS_ENV = "import json, os; print(json.dumps(dict(os.environ)))"


def test_exec_sets_both_cases_absolute_paths_and_appends_java_options(world: World, tmp_path: Path,
                                                                     test_ca: TestCA) -> None:
    """A stale lower-case proxy cannot win, a ~ confdir becomes an absolute path, the app's own
    JAVA_TOOL_OPTIONS stay (ours come after them, so ours win)."""
    env = {**wrapper_env(world, tmp_path, test_ca), "HOME": str(tmp_path / "home"),
           "SIDECAR_CONFDIR": "~/sidecar-conf", "https_proxy": "http://127.0.0.1:9", "no_proxy": "*",
           "JAVA_TOOL_OPTIONS": "-Xss2m -Dhttps.proxyPort=9"}
    out = subprocess.run([sys.executable, "-m", "sidecar", "exec", "--", sys.executable, "-c", CHILD_PRINTS_ENV],
                         env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    child = json.loads(out.stdout)
    trust = tmp_path / "home" / "sidecar-conf"
    proxy = child["HTTPS_PROXY"]
    assert proxy.startswith("http://127.0.0.1:")
    for upper in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"):
        assert child[upper.lower()] == child[upper], upper
    assert child["NO_PROXY"] == "localhost,127.0.0.1,::1"
    for name, file in (("REQUESTS_CA_BUNDLE", "ca-bundle.pem"), ("SSL_CERT_FILE", "ca-bundle.pem"),
                       ("CURL_CA_BUNDLE", "ca-bundle.pem"), ("NODE_EXTRA_CA_CERTS", "ca.pem")):
        assert child[name] == str(trust / file) and Path(child[name]).is_file(), name
    assert child["NODE_USE_ENV_PROXY"] == "1"
    java = child["JAVA_TOOL_OPTIONS"]
    port = proxy.rsplit(":", 1)[1]
    assert java.startswith("-Xss2m -Dhttps.proxyPort=9 -Dhttps.proxyHost=127.0.0.1 ")
    assert f"-Dhttps.proxyPort={port} " in java and f"-Djavax.net.ssl.trustStore={trust / 'truststore.p12'} " in java
    assert (trust / "truststore.p12").is_file()
    logged = next(line for line in out.stderr.splitlines() if "app environment" in line)
    assert "~" not in logged and f"REQUESTS_CA_BUNDLE={trust / 'ca-bundle.pem'}" in logged
    assert f"https_proxy={proxy}" in logged and f"no_proxy={child['NO_PROXY']}" in logged


def test_exec_java_refreshes_unchanged(world: World, tmp_path: Path, test_ca: TestCA) -> None:
    """`egress-sidecar exec -- java ...`: a JVM with no proxy or trust code, and a stale proxy of its own in
    JAVA_TOOL_OPTIONS and https_proxy, refreshes through the pair and trusts the sidecar's truststore."""
    with ConnectionCounter() as stale:
        token = world.salesforce.issue_refresh_token()
        env = {**wrapper_env(world, tmp_path, test_ca), **sf_env(token), "SIDECAR_ROUTE": "salesforce",
               "JAVA_TOOL_OPTIONS": f"-Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort={stale.port}",
               "https_proxy": stale.url, "HTTPS_PROXY": stale.url}
        out = subprocess.run([sys.executable, "-m", "sidecar", "exec", "--", java(), str(JAVA_CLIENT)], env=env,
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stdout + out.stderr
        assert stale.count == 0, "the JVM used the stale proxy"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["token_status"] == 200 and result["rest_status"] == 200, result
    assert result["refresh_token"] != token and world.salesforce.refresh_token_valid(str(result["refresh_token"]))
    seen = [(r.path, r.source_ip) for r in world.salesforce.seen]
    assert [p for p, _ in seen] == ["/services/oauth2/token", "/services/data/"]
    assert {ip for _, ip in seen} <= {"127.0.0.2", "127.0.0.3"}, seen
    assert f"Picked up JAVA_TOOL_OPTIONS: -Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort={stale.port} -D" in out.stderr
