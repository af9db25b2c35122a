"""``python -m bench.sidecar_variant run``: the real sidecar, instrumented for the profile and ablation runs.

- ``BENCH_PROFILE_PREFIX`` set: SIGUSR1 starts a fresh cProfile, SIGUSR2 stops it and writes
  ``PREFIX-N.prof`` (then an empty ``PREFIX-N.done``, so the bench knows the write finished). The
  window lets the bench profile only the token calls it sends, not the start or the probes.
- ``BENCH_DISABLE=grants,shield,record,audit``: those policy addons are left out of the token core (the
  grant tracking, the rotation shield, the log line and metrics, the audit trail), to measure what each
  costs per call. ``verify``: new upstream connections are not asked the IP echo before their CONNECT
  (each member's egress goes unverified, as with an https:// echo), to measure what verification costs.
- ``BENCH_BATCH_DELAY=0.005``: finished calls' records are applied that many seconds after the first of a
  batch (``sidecar.token.bookkeeping.BATCH_DELAY``; 0: once per loop iteration), to choose it by measuring.
  Anything else is the unmodified ``sidecar.app.cli.main``.
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
from pathlib import Path
from types import FrameType


def install_profiler(prefix: str) -> None:
    state: dict[str, object] = {"prof": None, "n": 0}

    def start(_sig: int, _frame: FrameType | None) -> None:
        if state["prof"] is None:
            prof = cProfile.Profile()
            state["prof"] = prof
            prof.enable()

    def stop(_sig: int, _frame: FrameType | None) -> None:
        prof = state["prof"]
        if not isinstance(prof, cProfile.Profile):
            return
        prof.disable()
        state["prof"] = None
        n = int(str(state["n"]))
        state["n"] = n + 1
        out = Path(f"{prefix}-{n}.prof")
        prof.dump_stats(out)
        out.with_suffix(".done").touch()

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


def disable(parts: set[str]) -> None:
    """Leave the named addons out of the token core (their class names, lower case: ``grants``,
    ``rotationshield``, ``record``, ``evidence``, ``guard``, ``audit``; ``shield`` is ``rotationshield``), and
    ``verify``: no IP echo on new upstream connections."""
    if "verify" in parts:
        from sidecar.egress.verify import Verifier

        Verifier.echo_for = lambda self, member: None  # type: ignore[method-assign]
    names = {"rotationshield" if p == "shield" else p for p in parts if p != "verify"}
    if not names:
        return
    from sidecar.token.core import TokenCore

    original = TokenCore.__init__

    def without(self: TokenCore, hosts: object, sender: object, addons: tuple[object, ...]) -> None:
        original(self, hosts, sender, tuple(a for a in addons if type(a).__name__.lower() not in names))  # type: ignore[arg-type]

    TokenCore.__init__ = without  # type: ignore[method-assign]


def main() -> int:
    prefix = os.environ.pop("BENCH_PROFILE_PREFIX", "")
    if prefix:
        install_profiler(prefix)
    delay = os.environ.pop("BENCH_BATCH_DELAY", "")
    if delay:
        import sidecar.token.bookkeeping

        sidecar.token.bookkeeping.BATCH_DELAY = float(delay)
    disable({p.strip() for p in os.environ.pop("BENCH_DISABLE", "").split(",") if p.strip()})
    from sidecar.app.cli import main as sidecar_main

    return sidecar_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
