"""Name lookups, kept apart from everything a token call waits on.

asyncio's ``loop.getaddrinfo`` runs in the loop's default executor (``min(32, cores + 4)`` threads: 6 on
two cores), shared with everything else that runs there, and it is used even for an IP literal. Eight
tunnels to names whose lookups hung for 12 s once held every one of those threads, and a token call to a
pair member (an IP literal) then waited behind them until its connect deadline: ``502
upstream_unreachable``, both members counted down, the sidecar reported not ready. Any local client can
cause that. So here:

- an IP literal (and the IPv4 shorthands a resolver reads, ``127.1``) never reaches ``getaddrinfo``: its
  address is built from the text, at once (:func:`numeric_infos`);
- a name is looked up by a :class:`Resolver`: its own daemon threads (never the default executor), at most
  ``max_lookups`` at a time, each lookup with a deadline. A lookup that hangs keeps its thread (libc's
  ``getaddrinfo`` cannot be interrupted) and its slot until libc gives up; lookups past the bound wait for
  a slot within their own deadline and then fail with :class:`LookupFailed`.

The service keeps two: one for the destinations clients ask for (tunnels, plain requests, requests
forwarded on token hosts) and one for token calls in direct mode (token hosts only), so no client can fill
the lookups a token call needs. Pair members and the prober connect to IP literals and look nothing up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import threading
from collections.abc import Awaitable, Callable

AddrInfo = tuple[int, int, int, tuple[object, ...]]  # (family, type, proto, sockaddr)
Lookup = Callable[[str, int], Awaitable[list[AddrInfo]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_SHORTHAND = re.compile(r"[0-9a-fA-FxX.]+")  # what an inet_aton IPv4 literal is made of

CLIENT_LOOKUPS = 4  # concurrent lookups for client destinations
TOKEN_LOOKUPS = 2  # and for token calls in direct mode
LOOKUP_TIMEOUT = 10.0  # seconds, waiting for a slot included; callers usually have a shorter deadline of their own


class LookupFailed(OSError):
    """A name could not be looked up in time (the message says why; no secret is in it)."""


class DestinationRefused(Exception):
    """A destination the rules refuse (sidecar.proxy.destinations, which a :data:`Lookup` may be); the message
    says why and is meant for the client. Here so that ``net`` can tell a refusal from a failure without
    importing the rules."""


def parse_ip(host: str) -> IPAddress | None:
    """The address an IP literal stands for, in every form a resolver reads as one: the standard forms,
    and the IPv4 shorthands ``inet_aton`` (and so ``getaddrinfo``) accepts: ``127.1``, ``2130706433``,
    ``0x7f.1``, ``0177.0.0.1`` (octal). An IPv4-mapped IPv6 address is its IPv4 address. None for a name."""
    text = host.strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        if not _SHORTHAND.fullmatch(text):
            return None
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip


def numeric_infos(host: str, port: int) -> list[AddrInfo] | None:
    """The address of an IP literal, as ``getaddrinfo`` would give it, without calling it; None for a name."""
    text = host.strip("[]")
    scope = text.partition("%")[2]
    ip = parse_ip(text)
    if ip is None:
        return None
    if ip.version == 4:
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, (str(ip), port))]
    try:
        scope_id = (int(scope) if scope.isdigit() else socket.if_nametoindex(scope)) if scope else 0
    except OSError:
        return None  # an interface this host does not have: let the resolver say so
    return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, (str(ip), port, 0, scope_id))]


class Resolver:
    """``getaddrinfo`` on threads of its own: at most ``max_lookups`` at once, each within ``timeout``."""

    def __init__(self, name: str, max_lookups: int, timeout: float = LOOKUP_TIMEOUT) -> None:
        self.name = name
        self.max_lookups = max_lookups
        self.timeout = timeout
        self._slots = asyncio.Semaphore(max_lookups)  # bound to the loop that first waits on it
        self.running = 0  # lookups in a thread right now (hung ones included)

    async def getaddrinfo(self, host: str, port: int) -> list[AddrInfo]:
        """``host``'s addresses for a TCP connection to ``port``. Raises LookupFailed, or the
        ``socket.gaierror`` of a name that does not resolve."""
        numeric = numeric_infos(host, port)
        if numeric is not None:
            return numeric
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise LookupFailed(f"cannot look up {host}: {self.max_lookups} name lookups have been under way for "
                               f"more than {self.timeout:g}s") from None
        done: asyncio.Future[list[AddrInfo]] = loop.create_future()
        self.running += 1

        def finish(infos: list[AddrInfo] | None, error: BaseException | None) -> None:
            self.running -= 1
            self._slots.release()  # only now: a hung lookup holds its slot as long as its thread
            if not done.done():
                if error is not None:
                    done.set_exception(error)
                else:
                    done.set_result(infos or [])

        def work() -> None:
            try:
                found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
                infos: list[AddrInfo] = [(f, t, p, addr) for f, t, p, _, addr in found]
                outcome: tuple[list[AddrInfo] | None, BaseException | None] = (infos, None)
            except Exception as exc:  # noqa: BLE001 - handed to the waiting coroutine
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # the loop has stopped: nobody waits any more
                loop.call_soon_threadsafe(finish, *outcome)

        threading.Thread(target=work, name=f"{self.name}-lookup", daemon=True).start()
        try:
            async with asyncio.timeout_at(deadline):
                return await done  # cancelled with its waiter; finish() then only frees the slot
        except TimeoutError:
            raise LookupFailed(f"looking up {host} took longer than {self.timeout:g}s") from None
