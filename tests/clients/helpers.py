"""Helpers for tests that run the client programs of tests/clients (the matrix, exec, the truststore)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.harness import CLIENT_ID, CLIENT_SECRET, TOKEN_URL, require_tool

CLIENTS = Path(__file__).resolve().parent
NODE_DIR = CLIENTS / "node"
JAVA_CLIENT = CLIENTS / "java" / "SalesforceRefresh.java"
SETUP_HINT = "run tests/clients/setup.sh (CI does)"


def java() -> str:
    return require_tool(("java",), "JAVA", SETUP_HINT)


def node() -> str:
    path = require_tool(("node",), "NODE", SETUP_HINT)
    if not (NODE_DIR / "node_modules").is_dir():  # as require_tool does: skip here, fail in CI
        message = f"{NODE_DIR / 'node_modules'} is missing: {SETUP_HINT}"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI is set but {message}", pytrace=False)
        pytest.skip(message)
    return path


def sf_env(refresh_token: str, token_url: str = TOKEN_URL) -> dict[str, str]:
    """What every client program reads besides its proxy and trust settings: the Salesforce side."""
    return {"SF_TOKEN_URL": token_url, "SF_REFRESH_TOKEN": refresh_token,
            "SF_CLIENT_ID": CLIENT_ID, "SF_CLIENT_SECRET": CLIENT_SECRET}


def run_client(argv: list[str], env: dict[str, str], timeout: float = 90) -> dict[str, object]:
    """Run a client program; its last stdout line is its JSON report (token_status, refresh_token,
    rest_status, api_versions)."""
    out = subprocess.run(argv, env=env, cwd=CLIENTS, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{argv} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1])


class ConnectionCounter:
    """A listener that counts the connections it gets and closes each at once: a proxy that must
    stay unused, or whose use must show."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        for _ in range(3000):  # at most 5 minutes
            if self._stop.is_set():
                return
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.count += 1
            conn.close()

    def __enter__(self) -> ConnectionCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
