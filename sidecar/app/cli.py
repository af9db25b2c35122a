"""The ``egress-sidecar`` command. It parses arguments and calls into the service; nothing more.

Exit codes: 0 success; 1 a check failed or the service stopped on an error; 2 bad configuration
(the message names the setting and the fix); 3 the sidecar cannot write its state at start, a full disk
(the message names the path and the fix).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence

from sidecar import __version__
from sidecar.config import (
    ConfigError,
    HostPort,
    Settings,
    StorageError,
    load_settings,
    settings_help,
    unknown_settings,
)
from sidecar.logs import setup_logging

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_STORAGE = 0, 1, 2, 3

log = logging.getLogger("egress_sidecar")

# Every setting with its default and meaning, generated from the Field descriptions in sidecar/config.py.
ENV_HELP = settings_help()


def _settings() -> Settings:
    settings = load_settings()
    for name in unknown_settings():
        print(f"egress-sidecar: warning: {name} is not a setting of egress-sidecar (ignored)", file=sys.stderr)
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings()
    setup_logging(settings.log_format, settings.log_level_number)
    from sidecar.app.service import Sidecar

    sidecar = Sidecar(settings)
    return asyncio.run(serve(sidecar))


async def serve(sidecar: object) -> int:
    from sidecar.app.service import Sidecar

    assert isinstance(sidecar, Sidecar)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sidecar.shutdown)
    await sidecar.run()
    return EXIT_OK if sidecar.proxy_address is not None else EXIT_FAIL


def _local_admin_url(settings: Settings) -> str:
    hp = settings.admin_address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(hp.host, hp.host)
    return f"http://{HostPort(host, hp.port)}"


def cmd_check(args: argparse.Namespace) -> int:
    from sidecar.ops.preflight import run_check

    settings = _settings()
    setup_logging(settings.log_format, logging.ERROR if not args.verbose else logging.INFO)
    admin_url = args.admin_url or _local_admin_url(settings)
    report = asyncio.run(run_check(settings, admin_url))
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.as_text())
    return EXIT_OK if report.ok else EXIT_FAIL


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.app.demo import run_demo

    phases = run_demo(calls=args.calls)
    observe, enforce, learn, isv = phases
    org_b, org_a = isv.orgs
    ok = (observe.total.get("ip_restricted", 0) > 0 and enforce.total.get("success", 0) == args.calls
          and learn.app_failures == 0 and org_b.app_failures <= 1 and org_a.app_failures == 0
          and org_a.by_egress.get(("127.0.0.3", 200), 0) > 0)
    return EXIT_OK if ok else EXIT_FAIL


def cmd_grants(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sidecar.state.grants import format_report, grants_report
    from sidecar.state.sqlite import reader_keys

    settings = _settings()
    confdir = Path(args.confdir).expanduser() if args.confdir else settings.confdir_path
    keys = reader_keys(confdir, settings.redis_key.get_secret_value() if settings.redis_key else None)
    try:
        report = grants_report(confdir, policy=settings.idle_expiry, keys=keys)
    except FileNotFoundError:
        print(f"egress-sidecar: no grants file in {confdir} (the sidecar creates grants.sqlite3 there when it "
              "starts); is SIDECAR_CONFDIR the sidecar's?", file=sys.stderr)
        return EXIT_FAIL
    except ValueError as exc:
        print(f"egress-sidecar: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    import contextlib
    from pathlib import Path

    from sidecar.ops.audit import (
        EXPORT_COLUMNS,
        SUMMARY_COLUMNS,
        Query,
        Reader,
        write_rows,
    )
    from sidecar.state.audit import AUDIT_FILE, connect_readonly
    from sidecar.state.sqlite import reader_keys

    settings = _settings()
    confdir = Path(args.confdir).expanduser() if args.confdir else settings.confdir_path
    keys = reader_keys(confdir, settings.redis_key.get_secret_value() if settings.redis_key else None)
    try:
        db = connect_readonly(confdir / AUDIT_FILE)
    except FileNotFoundError:
        print(f"egress-sidecar: no audit trail in {confdir} (the sidecar creates {AUDIT_FILE} there when it starts, "
              "unless SIDECAR_AUDIT_RETENTION=0); is SIDECAR_CONFDIR the sidecar's?", file=sys.stderr)
        return EXIT_FAIL
    except ValueError as exc:
        print(f"egress-sidecar: {exc}", file=sys.stderr)
        return EXIT_FAIL
    with contextlib.closing(db):
        reader = Reader(db, keys)
        query = Query(args.since, args.until, args.org, args.app)
        if args.summary:
            write_rows(reader.summary(query), SUMMARY_COLUMNS, args.format, sys.stdout)
        else:
            write_rows(reader.records(query), EXPORT_COLUMNS, args.format, sys.stdout)
        if reader.names is None:
            print("egress-sidecar: the apps, orgs, users and hosts of this trail are sealed under a key not found here "
                  "(grants.key in the confdir, or SIDECAR_REDIS_KEY when the sidecar shares state on Redis): they show "
                  "as unreadable", file=sys.stderr)
    return EXIT_OK


def _when(text: str) -> float:
    from sidecar.ops.audit import parse_when

    try:
        return parse_when(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _org_id(text: str) -> str:
    from sidecar.state.expiry import org_id_18

    try:
        return org_id_18(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_exec(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("egress-sidecar exec: give the command to run, e.g. egress-sidecar exec -- gunicorn app:app",
              file=sys.stderr)
        return EXIT_CONFIG
    settings = _settings()
    setup_logging(settings.log_format, settings.log_level_number)
    from sidecar.app.exec import run_wrapped
    from sidecar.app.service import Sidecar

    return asyncio.run(run_wrapped(Sidecar(settings), argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egress-sidecar",
        description="Forward-proxy sidecar that sends Salesforce token calls through an allowlisted "
        "QuotaGuard Static IP. Point the app's HTTPS_PROXY at it and trust its CA.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"egress-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run the sidecar (the default command)",
        description="Run the proxy and the admin server until SIGTERM/SIGINT. Configured by environment.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.set_defaults(func=cmd_run)
    check = sub.add_parser(
        "check",
        help="preflight: probe each pair member's egress IP and check it against the allowlist",
        description="Validate the configuration, resolve the pair, probe every member's egress IP through "
        "SIDECAR_ECHO_URL and compare with SIDECAR_ALLOWLIST; when a sidecar is running (--admin-url), judge with "
        "its guard mode and what Salesforce answered it through each egress IP (and say so when none answered). "
        "Exit 0 when every member is reachable and stable, every observed egress IP is listed and not refused by "
        "Salesforce (with no list typed: accepted by Salesforce), and NO_PROXY/no_proxy in the environment lists "
        "no Salesforce host (clients would send token calls around the sidecar); 1 otherwise; 2 on bad "
        "configuration. Usable as a deploy gate; run it in the app's environment.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--admin-url", metavar="URL", default=None,
                       help="admin URL of a running sidecar whose evidence (what Salesforce answered through "
                       "each egress IP) the check includes; default: the address SIDECAR_ADMIN_LISTEN gives "
                       "(0.0.0.0 read as 127.0.0.1). No sidecar there: not an error")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("-v", "--verbose", action="store_true", help="log probe details to stderr")
    check.set_defaults(func=cmd_check)
    grants = sub.add_parser(
        "grants",
        help="list the refresh token grants the sidecar tracks (rotation, reuse, idle time)",
        description="List the grants (refresh token rotation chains) recorded in SIDECAR_CONFDIR/grants.sqlite3, "
        "grouped by customer org: grant id (a keyed-hash prefix, never a token), user, last redemption, idle age, "
        "rotations, reuses and state (expiring, expired: by the org's refresh token expiry, SIDECAR_IDLE_POLICY), "
        "most idle first.",
    )
    grants.add_argument("--json", action="store_true", help="print the grants as JSON (each with its org and user, "
                        "and a summary per org)")
    grants.add_argument("--confdir", help="the sidecar's confdir (default: SIDECAR_CONFDIR)")
    grants.set_defaults(func=cmd_grants)
    audit = sub.add_parser(
        "audit",
        help="export the audit trail: every token call with its app, org, grant and egress IP",
        description="Export the audit trail recorded in SIDECAR_CONFDIR/audit.sqlite3 to standard output: one record "
        "per token call (time, app client_id, org id, user id, grant id, grant type, token host, egress IP and whether "
        "it was verified, member, outcome, Salesforce's error code, retried, coalesced, replayed), oldest first; never "
        "a token or a secret. Reads the file whether or not the sidecar runs. With --summary: per org and egress IP, "
        "calls, counts by outcome, first and last seen. Exit 0; 1 no audit trail or unreadable; 2 bad arguments.",
    )
    audit.add_argument("--since", type=_when, metavar="WHEN",
                       help="records from this time on: ISO 8601 (2026-11-01, 2026-11-01T12:00:00Z; UTC without an "
                       "offset) or a duration ago (7d, 12h)")
    audit.add_argument("--until", type=_when, metavar="WHEN", help="records before this time (same forms as --since)")
    audit.add_argument("--org", type=_org_id, metavar="ORG_ID", help="only this customer org (15 or 18 characters)")
    audit.add_argument("--app", metavar="CLIENT_ID", help="only this app: its client_id, or its short label as the log "
                       "shows it")
    audit.add_argument("--format", choices=("csv", "json"), default="csv",
                       help="csv (with a header row, the default) or json (JSON lines)")
    audit.add_argument("--summary", action="store_true",
                       help="per org and egress IP: calls, counts by outcome, first and last seen")
    audit.add_argument("--confdir", help="the sidecar's confdir (default: SIDECAR_CONFDIR)")
    audit.set_defaults(func=cmd_audit)
    wrap = sub.add_parser(
        "exec",
        help="run COMMAND with the sidecar beside it (Heroku-style wrapper)",
        description="Start the sidecar, wait until it is ready, then run COMMAND with HTTPS_PROXY, HTTP_PROXY, "
        "NO_PROXY (loopback plus the entries of its own NO_PROXY that name no Salesforce host; each also in lower case), REQUESTS_CA_BUNDLE, SSL_CERT_FILE, CURL_CA_BUNDLE, "
        "NODE_EXTRA_CA_CERTS, NODE_USE_ENV_PROXY=1 and JAVA_TOOL_OPTIONS (proxy and truststore properties, "
        "appended to the command's own) set for it, with absolute paths. Warns when the NO_PROXY it was started "
        "with lists a Salesforce host (left out for COMMAND). SIGTERM and SIGINT are forwarded to COMMAND; the exit status is COMMAND's "
        "(127 when it is not found). Procfile: web: egress-sidecar exec -- gunicorn app:app",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    wrap.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS]", help="the command to run")
    wrap.set_defaults(func=cmd_exec)
    demo = sub.add_parser(
        "demo",
        help="show the partial-allowlist failure and the fix on loopback, no credentials needed",
        description="Start a simulated QuotaGuard pair (127.0.0.2, 127.0.0.3), a simulated Salesforce that "
        "allowlists only 127.0.0.2, and the sidecar, all on loopback in this process; redeem refresh tokens "
        "with the guard observing, then enforcing; print a report. Ends by itself; exit 0 when the "
        "demo showed what it should.",
    )
    demo.add_argument("--calls", type=int, default=20, metavar="N",
                      help="refresh token redemptions per phase (default 20)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        args = parser.parse_args(["run", *(argv if argv is not None else sys.argv[1:])])
    try:
        return int(args.func(args))
    except StorageError as exc:
        print(f"egress-sidecar: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    except ConfigError as exc:
        print(f"egress-sidecar: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `egress-sidecar grants | head`: the reader left, nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
