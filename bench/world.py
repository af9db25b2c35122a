"""The simulated world for the benchmarks, in its own process.

Why a process of its own: the fakes are Python servers on asyncio threads; sharing the GIL with the
measuring client would add the client's own work to every contender's latency. Here they run apart,
and the bench talks to this process over a line protocol on stdin/stdout:

- on start it prints one JSON line: the addresses of Salesforce, the pair members, the echo, the bulk
  server and the CA that signed their certificates;
- ``tokens N`` answers a JSON list of N fresh refresh tokens (Salesforce rotates them on every
  redemption, so each client follows its own chain);
- ``reset`` makes the fakes forget the requests they recorded (the bench sends it between phases);
- ``quit`` or end of input stops every server and exits.

The bulk server is the passthrough target (a non-token TLS host): ``GET /bulk?bytes=N`` streams N
zero bytes, ``GET /small`` answers two bytes and keeps the connection open. It uses blocking sockets
in threads, so encryption runs in OpenSSL with the GIL released and the server is not the bottleneck.
"""

from __future__ import annotations

import gc
import json
import socket
import ssl
import sys
import threading
from pathlib import Path

from sidecar.sim.certs import TestCA, server_context
from tests.harness import SF_HOST, start_world, stop_world

# 127.0.0.1 too, so the "no proxy" floor (client straight to Salesforce) is answered like the rest.
SF_ALLOWLIST = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
CHUNK = 1 << 20
MAX_BULK = 4 << 30
MAX_CONNS = 2000
IO_TIMEOUT = 60.0


class BulkServer:
    """TLS server streaming zeros (passthrough throughput) or answering tiny keep-alive responses."""

    def __init__(self, certfile: Path, keyfile: Path, host: str = "127.0.0.1") -> None:
        self.ctx = server_context(certfile, keyfile)
        self.sock = socket.create_server((host, 0), backlog=1024)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopped = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="bulk-accept", daemon=True)
        self._zeros = memoryview(bytes(CHUNK))

    def start(self) -> BulkServer:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self.sock.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in [self._acceptor, *threads]:
            t.join(5)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                if len(self._conns) >= MAX_CONNS:
                    conn.close()
                    continue
                self._conns.add(conn)
                t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self._threads.add(t)
            t.start()

    def _serve(self, raw: socket.socket) -> None:
        tls: ssl.SSLSocket | None = None
        try:
            raw.settimeout(IO_TIMEOUT)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as real servers do; no Nagle stalls
            tls = self.ctx.wrap_socket(raw, server_side=True)
            buf = b""
            for _ in range(100_000):  # requests per connection, bounded
                while b"\r\n\r\n" not in buf:
                    data = tls.recv(65536)
                    if not data or len(buf) > 65536:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode("latin-1") if b" " in head else "/"
                if target.startswith("/bulk"):
                    n = min(int(target.partition("bytes=")[2] or CHUNK), MAX_BULK)
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                b"Content-Length: %d\r\n\r\n" % n)
                    while n > 0:
                        k = min(n, CHUNK)
                        tls.sendall(self._zeros[:k])
                        n -= k
                elif target.startswith("/small"):
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                else:
                    tls.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    return
        except (OSError, ValueError):
            return
        finally:
            (tls or raw).close()
            with self._lock:
                self._conns.discard(raw)
                self._threads.discard(threading.current_thread())


def main(argv: list[str]) -> int:
    workdir = Path(argv[0])
    ca = TestCA(workdir / "world-ca")
    sf_cert = ca.issue([SF_HOST, "test.salesforce.com", "*.my.salesforce.com", "localhost", "127.0.0.1"], "salesforce")
    bulk_cert = ca.issue(["localhost", "127.0.0.1"], "bulk")
    world = start_world(sf_cert, SF_ALLOWLIST)
    bulk = BulkServer(*bulk_cert).start()
    try:
        info = {
            "ca": str(ca.ca_path),
            "salesforce": list(world.salesforce.address),
            "echo": list(world.echo.address),
            "members": [list(m.address) for m in world.pair.members],
            "bulk": list(bulk.address),
        }
        print(json.dumps(info), flush=True)
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "tokens":
                n = max(0, min(int(arg or 1), 10_000))
                print(json.dumps([world.salesforce.issue_refresh_token() for _ in range(n)]), flush=True)
            elif cmd == "reset":  # forget what the fakes recorded, so their memory (and GC work) stays flat
                world.salesforce.reset_seen()
                world.echo.reset_hits()
                for member in world.pair.members:
                    member.reset_counters()
                gc.collect()
                print(json.dumps({"ok": True}), flush=True)
            elif cmd == "quit":
                break
            else:
                print(json.dumps({"error": f"unknown command {cmd!r}"}), flush=True)
    finally:
        bulk.stop()
        stop_world(world)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
