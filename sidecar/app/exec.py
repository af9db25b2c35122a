"""``egress-sidecar exec -- COMMAND``: run a command with the sidecar beside it, Heroku-style.

Like QuotaGuard's own ``qgtunnel your-command``: the sidecar starts in this process, the command
starts once the sidecar is ready, with the proxy and trust variables set for it (``client_env``: both
cases of the proxy variables, so a stale lower-case one cannot win, and ``JAVA_TOOL_OPTIONS`` appended
to the command's own, so a JVM takes the proxy and the truststore); SIGTERM and SIGINT are passed on to
the command, and its exit status becomes ours. For a Procfile:
``web: egress-sidecar exec -- gunicorn app:app``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from sidecar.app.service import Sidecar
from sidecar.logs import event
from sidecar.ops.noproxy import bypass_warnings, other_entries
from sidecar.ops.trust import DEFAULT_NO_PROXY, client_env

log = logging.getLogger("egress_sidecar.exec")
READY_WAIT_SECONDS = 30.0
EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE = 127, 126


def child_environment(trust_dir: Path, proxy_url: str, base: Mapping[str, str],
                      token_hosts: Iterable[str] = ()) -> dict[str, str]:
    """``base`` with the app environment set over it; JAVA_TOOL_OPTIONS is appended to, not replaced
    (a JVM takes the last of repeated properties, so ours win and the app's other options stay). NO_PROXY is
    loopback plus ``base``'s own entries that name no Salesforce host (those would skip the sidecar)."""
    env = dict(base)
    own = [e for e in other_entries(base, token_hosts) if e not in DEFAULT_NO_PROXY.split(",")]
    extra = client_env(trust_dir, proxy_url, ",".join([DEFAULT_NO_PROXY, *own]))
    own_java = env.get("JAVA_TOOL_OPTIONS", "").strip()
    if own_java:
        extra["JAVA_TOOL_OPTIONS"] = f"{own_java} {extra['JAVA_TOOL_OPTIONS']}"
    env.update(extra)
    return env


async def _wait_ready(sidecar: Sidecar, serving: asyncio.Task[None]) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_WAIT_SECONDS
    while loop.time() < deadline:
        if serving.done():
            serving.result()  # raises the sidecar's start-up error
            return False
        ready, _ = sidecar.is_ready()
        if ready:
            return True
        await asyncio.sleep(0.05)
    return sidecar.wait_listening(0)


async def run_wrapped(sidecar: Sidecar, argv: Sequence[str]) -> int:
    for line in bypass_warnings(os.environ, sidecar.settings.token_hosts):
        event(log, logging.WARNING, f"{line} egress-sidecar exec leaves the Salesforce entries out of the "
              "command's NO_PROXY (loopback and your other entries stay), so this command is not affected; anything "
              "started without exec is.")
    serving = asyncio.create_task(sidecar.run(), name="sidecar")
    try:
        listening = await _wait_ready(sidecar, serving)
        if not listening:
            print("egress-sidecar exec: the sidecar did not start; not running the command", file=sys.stderr)
            return 1
        ready, why = sidecar.is_ready()
        if not ready:
            event(log, logging.WARNING, f"running the command although the sidecar is not ready: {why}")
        try:
            env = child_environment(sidecar.trust_dir, sidecar.proxy_url, os.environ, sidecar.settings.token_hosts)
            proc = await asyncio.create_subprocess_exec(*argv, env=env)
        except FileNotFoundError:
            print(f"egress-sidecar exec: command not found: {argv[0]}", file=sys.stderr)
            return EXIT_NOT_FOUND
        except PermissionError:
            print(f"egress-sidecar exec: command not executable: {argv[0]}", file=sys.stderr)
            return EXIT_NOT_EXECUTABLE
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _forward, proc, sig)
        code = await proc.wait()
        return code if code >= 0 else 128 - code  # killed by signal N: 128+N, as a shell reports it
    finally:
        sidecar.shutdown()
        await asyncio.gather(serving, return_exceptions=True)


def _forward(proc: asyncio.subprocess.Process, sig: int) -> None:
    if proc.returncode is None:
        proc.send_signal(sig)
