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
from collections.abc import Callable
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

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = dict(getattr(record, EVENT_FIELDS, {}) or {})
        msg = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            msg = f"{msg}: {record.exc_info[1]!r}"
        if self.fmt == "json":
            line = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": msg,
                **fields,
            }
            out = json.dumps(line, default=str, separators=(",", ":"))
        else:
            extra = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
            stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
            out = f"{stamp} {record.levelname:<7} {msg}" + (f" {extra}" if extra else "")
        return self.scrubber.scrub(out)


SCRUBBER = SecretScrubber()


def setup_logging(fmt: str = "json", level: int = logging.INFO, stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(fmt, SCRUBBER))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # mitmproxy is chatty at INFO (every client connect); keep its warnings and errors.
    logging.getLogger("mitmproxy").setLevel(max(level, logging.WARNING))


_QUOTED = re.compile(r"""b?(['"]).*?\1""", re.S)


def cause(exc: BaseException) -> str:
    """What went wrong, for a log line: the exception's type and its message, with anything it quotes
    (a value, a line, bytes of a token) left out, at most 200 characters."""
    text = _QUOTED.sub("…", str(exc)).strip()[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
