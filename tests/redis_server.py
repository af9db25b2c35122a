"""Real redis-servers for the tests that share state between sidecars: started on loopback on a free
port, without persistence (a restart loses everything, as a Redis restart without persistence does),
stopped when the test ends."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import free_port, require_tool, wait_until


@dataclass
class RedisServer:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    command: list[str] = field(default_factory=list)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def restart(self) -> None:
        """Start again on the same port, empty (what a killed Redis without persistence comes back as)."""
        if self.proc.poll() is None:
            self.kill()
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: pong(self.port), timeout=10), "redis-server did not restart"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Start (and stop) real redis-servers on loopback, no persistence."""
    binary = require_tool(("redis-server",), "REDIS_SERVER", "apt-get install redis-server")
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        port = free_port()
        workdir = tmp_path / f"redis-{port}"
        workdir.mkdir()
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(workdir), "--protected-mode", "yes"]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers.append(RedisServer(f"redis://127.0.0.1:{port}/0", port, proc, command))
        assert wait_until(lambda: pong(port), timeout=10), "redis-server did not start"
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
            c.sendall(b"PING\r\n")
            return c.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def settled(url: str, timeout: float = 10.0) -> bool:
    """Wait until the sidecars' state on this Redis is older than RESTART_GRACE: before that no lock is
    granted (a Redis that just lost its state gives holders from before the time to put theirs back),
    so which of two replicas' redemptions goes first would be a race. (A deployment is past it seconds
    after Redis's start.)"""
    import redis

    from sidecar.state.redis import BORN, RESTART_GRACE

    def age() -> float:
        client = redis.Redis.from_url(url)
        try:
            born = client.get(BORN)
            seconds, micros = client.time()
        finally:
            client.close()
        return -1.0 if born is None else (seconds * 1000 + micros // 1000 - int(born)) / 1000

    return wait_until(lambda: age() > RESTART_GRACE, timeout=timeout, interval=0.1)


def redis_dump(url: str) -> list[bytes]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return [k + b"=" + (client.dump(k) or b"") for k in client.keys("*")]
    finally:
        client.close()
REDIS_KEY = "5f" * 32  # SIDECAR_REDIS_KEY of the replicas in tests
