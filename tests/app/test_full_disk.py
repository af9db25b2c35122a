"""A full disk at start: one line naming the path and the fix, exit code 3, and nothing left behind that
a later start (with space freed) trips over.

The disk is a real one that fills up: a tmpfs of a few KiB, mounted in a mount namespace of the test's own
(``unshare --user --map-root-user --mount``, which needs no root), holding SIDECAR_CONFDIR. Its size
decides which write meets ENOSPC first: the CA, SQLite (``database or disk is full``), or the trust files.
Was (issue 24): a traceback and exit 1 (``sqlite3.OperationalError: database or disk is full``, and the
grants file moved aside as if corrupt), or, for the trust files, an "Addon error" and a sidecar that ran on
without ever listening.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT, require_tool

EXIT_STORAGE = 3


def run_on_tiny_disk(tmp_path: Path, size: str, then: str = "", trust_elsewhere: bool = False
                     ) -> subprocess.CompletedProcess[str]:
    """Start the sidecar with its confdir on a fresh tmpfs of ``size`` (and the trust files too, unless
    ``trust_elsewhere``); ``then``: shell commands run after it exits, in the same namespace (the tmpfs is
    still mounted)."""
    unshare = require_tool(("unshare",), "UNSHARE", "apt-get install util-linux")
    mnt = tmp_path / "disk"
    mnt.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not (k.startswith("SIDECAR_") or k.lower().endswith("_proxy"))}
    env.update(SIDECAR_CONFDIR=str(mnt / "confdir"), SIDECAR_LISTEN="127.0.0.1:0", SIDECAR_ADMIN_LISTEN="127.0.0.1:0",
               SIDECAR_LOG_FORMAT="json", PYTHONPATH=str(ROOT))
    if trust_elsewhere:
        env["SIDECAR_TRUST_DIR"] = str(tmp_path / "trust")
    run = f"timeout 20 {shlex.quote(sys.executable)} -m sidecar run"
    script = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mnt))} && {{ {run}; echo \"exit=$?\" >&2; }}"
    proc = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script + then], env=env,
                          capture_output=True, text=True, timeout=90, cwd=ROOT)
    if "exit=" not in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()[:200]}")
    return proc


def exit_code(proc: subprocess.CompletedProcess[str]) -> int:
    return int(proc.stderr.rsplit("exit=", 1)[1].split()[0])


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("egress-sidecar:")]


CASES = [  # (tmpfs size, trust files elsewhere, the file named, the cause named)
    ("8k", False, "mitmproxy-ca.pem", "No space left on device"),  # the CA, before anything else is written
    ("160k", False, "ca-bundle.pem", "No space left on device"),  # the trust files apps read
    ("72k", True, "grants.sqlite3", "database or disk is full"),  # SQLite's own words (SQLITE_FULL)
    ("48k", True, "grants.sqlite3", "disk I/O error"),  # SQLite, when the full disk hits its shared memory file
    ("160k", True, "audit.sqlite3", "database or disk is full"),  # the audit trail, opened after the grants
]


@pytest.mark.parametrize("size,trust_elsewhere,path,cause", CASES)
def test_a_full_disk_at_start_is_one_line_naming_the_path_and_the_fix(tmp_path: Path, size: str, trust_elsewhere: bool,
                                                                       path: str, cause: str) -> None:
    proc = run_on_tiny_disk(tmp_path, size, then=f"; ls -a {shlex.quote(str(tmp_path / 'disk' / 'confdir'))}",
                            trust_elsewhere=trust_elsewhere)
    assert exit_code(proc) == EXIT_STORAGE, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Addon error" not in proc.stderr, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert f"{path}': the disk is full ({cause}). Free space on that volume" in line, line
    left = proc.stdout.split()
    assert not [n for n in left if n.endswith(".tmp") or ".corrupt-" in n or n.startswith(".ca-")], left


def test_a_start_after_space_was_freed_finds_nothing_broken(tmp_path: Path) -> None:
    """The failed starts leave no half-written CA, key or grants file: with the disk grown, the next start
    becomes ready (was: a CA file cut short by the full disk would never load again)."""
    log = shlex.quote(str(tmp_path / "again.log"))
    # After the failed start: grow the disk, start again in the background, stop it (by its pid) once it
    # listens, and report how it ended.
    again = (f"; mount -o remount,size=4m {shlex.quote(str(tmp_path / 'disk'))}"
             f"; {shlex.quote(sys.executable)} -m sidecar run 2>{log} & pid=$!"
             f"; for i in $(seq 1 150); do grep -q 'listening on' {log} && break; sleep 0.1; done"
             "; kill -TERM $pid; wait $pid; echo \"again=$?\" >&2")
    for size, trust_elsewhere, _, _ in CASES:
        proc = run_on_tiny_disk(tmp_path, size, then=again, trust_elsewhere=trust_elsewhere)
        assert exit_code(proc) == EXIT_STORAGE, proc.stderr[-2000:]
        second = (tmp_path / "again.log").read_text()
        assert "again=0" in proc.stderr and "listening on" in second, (proc.stderr[-1000:], second[-2000:])
