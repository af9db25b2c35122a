"""A TCP proxy in front of a real redis-server that counts round trips and can delay them: what a
replica pays per Redis call when Redis is a network away. Loopback only; the test that starts it stops it.
(Redis clients here give up on a reply after 0.5 s: keep ``delay`` well under that.)

A round trip is one turn of a connection: the client writes (a command, a pipeline, a script) and then
waits for Redis to answer before it writes again. The proxy counts a turn each time the client writes
after Redis has spoken (or first), however TCP splits the bytes, and keeps each turn's bytes and the
moments it reached the proxy and was passed on to Redis: ``delay`` seconds later, so each round trip
takes ``delay`` longer."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Turn:
    connection: int
    arrived: float  # time.monotonic() when its first bytes reached the proxy
    forwarded: float = 0.0  # when its last bytes were passed on to Redis
    data: bytearray = field(default_factory=bytearray)


class RedisProxy:
    def __init__(self, redis_port: int, delay: float = 0.0) -> None:
        self.redis_port = redis_port
        self.delay = delay  # added to every write toward Redis: once per round trip
        self.turns: list[Turn] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        for n in range(10_000):  # bounded: connections a test makes
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.redis_port), timeout=5)
            except OSError:
                return
            upstream.settimeout(None)
            with self._lock:
                self._socks += [client, upstream]
            state = {"last": "redis"}  # who wrote last on this connection
            self._spawn(self._pump, n, client, upstream, True, state)
            self._spawn(self._pump, n, upstream, client, False, state)

    def _pump(self, n: int, src: socket.socket, dst: socket.socket, to_redis: bool, state: dict[str, str]) -> None:
        for _ in range(10_000_000):  # bounded: chunks on one connection
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            turn = None
            if to_redis:
                with self._lock:
                    if state["last"] != "client":
                        state["last"] = "client"
                        self.turns.append(Turn(n, time.monotonic()))
                    turn = next(t for t in reversed(self.turns) if t.connection == n)
                    turn.data += data
            else:
                state["last"] = "redis"
            if self.delay and to_redis:
                time.sleep(self.delay)
            try:
                dst.sendall(data)
            except OSError:
                return
            if turn is not None:
                turn.forwarded = time.monotonic()

    def mark(self) -> int:
        """How many turns so far (to count the ones after this point)."""
        with self._lock:
            return len(self.turns)

    def since(self, mark: int, *needles: bytes) -> list[Turn]:
        """The turns after ``mark`` whose bytes hold any of ``needles`` (all of them without needles)."""
        with self._lock:
            return [t for t in self.turns[mark:] if not needles or any(x in t.data for x in needles)]

    def refuse_new(self) -> None:
        """Stop accepting connections (a new one is refused); those open go on."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self._listener.close()

    def close(self) -> None:
        self.refuse_new()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> RedisProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
