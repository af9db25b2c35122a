"""Logging: one line per event, JSON (default) or text, with secrets scrubbed as a last defence.

The code never logs a secret on purpose; the scrubber replaces any known secret (the proxy password,
its Basic credential, the client proxy password) that reaches a handler anyway, e.g. inside an
exception text from a library.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

EVENT_FIELDS = "fields"  # `logger.info(msg, extra={"fields": {...}})` puts structured fields on a line


class SecretScrubber(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def add(self, *secrets: str | None) -> None:
        self.secrets.update(s for s in secrets if s and len(s) >= 3)

    def scrub(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, "***")
        return text


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str, scrubber: SecretScrubber) -> None:
        super().__init__()
        self.fmt = fmt
        self.scrubber = scrubber
        # One encoder for every line (json.dumps with options builds a new one per call), and the time
        # stamp's seconds formatted once per second: both showed in the profile of the per-call line.
        self._json = json.JSONEncoder(default=str, separators=(",", ":")).encode
        self._second = -1
        self._stamp = ""

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._stamp

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, EVENT_FIELDS, None) or {}
        msg = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            msg = f"{msg}: {record.exc_info[1]!r}"
        if self.fmt == "json":
            line = {
                "time": f"{self._time(record.created)}.{int(record.msecs):03d}Z",
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": msg,
                **fields,
            }
            out = self._json(line)
        else:
            extra = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
            stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
            out = f"{stamp} {record.levelname:<7} {msg}" + (f" {extra}" if extra else "")
        return self.scrubber.scrub(out)


class _LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose lines can be held and written together (:func:`batched_lines`)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.holds = 0
        self.held: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not self.holds:
            super().emit(record)
            return
        try:
            self.held.append(self.format(record))
        except Exception:  # noqa: BLE001 - as logging's own handlers: a bad record never breaks the caller
            self.handleError(record)

    def hold_lines(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self.holds += 1

    def write_held(self) -> None:
        """End one hold; at the last, write what was held in one write. (Not ``release``: that is the lock's.)"""
        with self.lock:  # type: ignore[union-attr]
            self.holds -= 1
            if self.holds or not self.held:
                return
            text, self.held = "\n".join(self.held) + "\n", []
            try:
                self.stream.write(text)
                self.flush()
            except Exception:  # noqa: BLE001 - as logging's handleError: a closed stream never breaks the caller
                if logging.raiseExceptions:
                    traceback.print_exc(file=sys.stderr)


SCRUBBER = SecretScrubber()


_HANDLER: _LineHandler | None = None  # the handler setup_logging installed (its lines can be held)


def setup_logging(fmt: str = "json", level: int = logging.INFO, stream: TextIO | None = None) -> None:
    global _HANDLER
    handler = _HANDLER = _LineHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(fmt, SCRUBBER))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # No line shows where it was logged from, or which thread, process or task logged it: the logging HOWTO's
    # "Optimization" section (docs.python.org/3/howto/logging.html#optimization) names these switches; each
    # record then skips a stack walk and four look-ups (the per-call record showed them in its profile).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]
    # mitmproxy is chatty at INFO (every client connect); keep its warnings and errors.
    logging.getLogger("mitmproxy").setLevel(max(level, logging.WARNING))


_QUOTED = re.compile(r"""b?(['"]).*?\1""", re.S)


def cause(exc: BaseException) -> str:
    """What went wrong, for a log line: the exception's type and its message, with anything it quotes
    (a value, a line, bytes of a token) left out, at most 200 characters."""
    text = _QUOTED.sub("…", str(exc)).strip()[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def batched_lines() -> Iterator[None]:
    """Lines logged inside are written together at the end, in one write to the log stream (the batch of
    token call records: one write instead of one per call). Lines from other threads meanwhile are held
    too, in their order. A no-op when logging was not set up by :func:`setup_logging`."""
    handler = _HANDLER
    if handler is None:
        yield
        return
    handler.hold_lines()
    try:
        yield
    finally:
        handler.write_held()


def event(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    logger.log(level, msg, extra={EVENT_FIELDS: fields})


class Throttle:
    """At most one log line per ``every`` seconds for an event that can repeat in a flood (a client
    refused at the connection cap), each line saying how many events it stands for, none lost.

    The first event is emitted at once and opens a window; events inside it are held; when the window
    ends the held ones are emitted as one count (opening the next window), or the window closes. Runs
    on the event loop that calls ``note()``.
    """

    def __init__(self, every: float, emit: Callable[[int], None]) -> None:
        self.every = every
        self.emit = emit
        self.held = 0
        self._timer: asyncio.TimerHandle | None = None

    def note(self) -> None:
        self.held += 1
        if self._timer is None:
            self._window_end()

    def _window_end(self) -> None:
        if not self.held:
            self._timer = None
            return
        count, self.held = self.held, 0
        self._timer = asyncio.get_running_loop().call_later(self.every, self._window_end)
        self.emit(count)

    def close(self) -> None:
        """Emit what is held and stop the timer (at shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.held:
            count, self.held = self.held, 0
            self.emit(count)
