"""The one bidirectional pipe: bytes copied both ways between two streams (a relayed tunnel, a connection
upgraded with ``101``), never buffered beyond about two chunks per direction, with one idle clock for both.

Half-closes and resets are passed on; a pipe on which nothing moved for ``idle_timeout`` seconds is cut
with a reset on both sides; progress of a send to a slow reader (bytes leaving the kernel's send queue)
counts as activity, so a slow but steady download is never cut.
"""

from __future__ import annotations

import asyncio

from sidecar.net.streams import CHUNK, SocketStream, Stream

MAX_WAKEUPS = 10_000_000  # bounded: reads of one direction, and idle checks of one pipe


def _unsent(stream: Stream) -> int:
    """Bytes written to ``stream`` and not yet taken by its peer."""
    return (stream.raw if not isinstance(stream, SocketStream) else stream).unsent()


async def pipe(a: Stream, b: Stream, idle_timeout: float, a_to_b: bytes = b"", b_to_a: bytes = b"", *,
               until_b_ends: bool = False) -> None:
    """Copy both ways until both directions are done (or, with ``until_b_ends``, until ``b`` has nothing more
    to say: a server that ended an upgraded connection), or nothing moved for ``idle_timeout`` seconds
    (then both are reset). ``a_to_b``/``b_to_a``: bytes already read that go first in their direction
    (what a stream has received and not yet given out follows them)."""
    loop = asyncio.get_running_loop()
    last = [loop.time()]
    reset = [False]

    async def copy(src: Stream, dst: Stream, first: bytes) -> None:
        try:
            data = first
            for _ in range(MAX_WAKEUPS):
                if data:
                    last[0] = loop.time()
                    await dst.send(data)
                    last[0] = loop.time()
                data = await src.recv(CHUNK)  # what has arrived, at most a chunk
                if not data:
                    break
        except ConnectionResetError:
            reset[0] = True
        except OSError:
            pass
        finally:
            if isinstance(dst, SocketStream):  # (a TLS stream ends with the connection)
                dst.shutdown_write()

    upward = asyncio.create_task(copy(a, b, a_to_b))
    downward = asyncio.create_task(copy(b, a, b_to_a))
    tasks = [upward, downward]
    seen_queued = (0, 0)
    idle = False
    try:
        for _ in range(MAX_WAKEUPS):
            watch = [downward] if until_b_ends else tasks
            done, _ = await asyncio.wait(watch, timeout=min(idle_timeout, 30.0), return_when=asyncio.ALL_COMPLETED)
            if len(done) == len(watch) or reset[0]:
                break
            if loop.time() - last[0] > idle_timeout:
                # Bytes queued for a slow reader drain without any call of ours: a queue that shrank since the
                # last look is progress, not idleness.
                queued = (_unsent(a), _unsent(b))
                if queued != seen_queued:
                    seen_queued = queued
                    last[0] = loop.time()
                    continue
                idle = True
                break
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if idle or reset[0]:
            a.abort()
            b.abort()
