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

import h11

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

    @staticmethod
    def _request(tls: ssl.SSLSocket, conn: h11.Connection) -> h11.Request | None:
        """The next request, read to its end by h11; None when the client is done."""
        request = None
        for _ in range(1000):  # bounded: reads per request
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = tls.recv(65536)
                conn.receive_data(data)
                if not data:
                    return None
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif not isinstance(event, h11.Data):
                return None
        return None

    def _serve(self, raw: socket.socket) -> None:
        tls: ssl.SSLSocket | None = None
        try:
            raw.settimeout(IO_TIMEOUT)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as real servers do; no Nagle stalls
            tls = self.ctx.wrap_socket(raw, server_side=True)
            conn = h11.Connection(h11.SERVER)
            for _ in range(100_000):  # requests per connection, bounded
                request = self._request(tls, conn)
                if request is None:
                    return
                target = request.target.decode("latin-1")
                if target.startswith("/bulk"):
                    n = min(int(target.partition("bytes=")[2] or CHUNK), MAX_BULK)
                    tls.sendall(conn.send(h11.Response(status_code=200, reason=b"OK", headers=[
                        (b"Content-Type", b"application/octet-stream"), (b"Content-Length", b"%d" % n)])))
                    while n > 0:
                        k = min(n, CHUNK)
                        for piece in conn.send_with_data_passthrough(h11.Data(data=self._zeros[:k])) or []:
                            tls.sendall(piece)  # no copy of the payload
                        n -= k
                    conn.send(h11.EndOfMessage())
                elif target.startswith("/small"):
                    tls.sendall(b"".join(conn.send(e) or b"" for e in (
                        h11.Response(status_code=200, reason=b"OK", headers=[(b"Content-Length", b"2")]),
                        h11.Data(data=b"ok"), h11.EndOfMessage())))
                else:
                    tls.sendall(b"".join(conn.send(e) or b"" for e in (
                        h11.Response(status_code=404, reason=b"Not Found",
                                     headers=[(b"Content-Length", b"0"), (b"Connection", b"close")]),
                        h11.EndOfMessage())))
                    return
                conn.start_next_cycle()
        except (OSError, ValueError, h11.ProtocolError):
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
