"""The lock files agree with pyproject.toml, with each other and with the image's Python.

requirements.lock (runtime + build backend, installed by the Dockerfile) and requirements-dev.lock
(the same pins + the test and bench extras, installed by the Makefile and CI) are written by
`make lock` (uv pip compile --universal --generate-hashes). These checks are offline: they read the
files, they do not resolve anything. A dependency added to pyproject.toml without `make lock`, a
removed one still pinned, a pin outside pyproject's range, a missing hash, or a Python version that
differs between the Dockerfile, the locks and the interpreter running the tests, each fails here.
"""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
PROJECT = "egress-sidecar"
FIX = "run `make lock` and commit both lock files"


@dataclass
class Pin:
    name: str
    version: str
    marker: Marker | None
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)


def parse_lock(text: str) -> dict[str, Pin]:
    """name -> Pin, from a requirements file as uv pip compile writes it."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    in_via = False
    for raw in text.splitlines():
        line = raw.rstrip("\\").rstrip()
        if not line.strip():
            continue
        if not raw.startswith((" ", "#")):
            req = Requirement(line)
            specs = list(req.specifier)
            assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {line!r}"
            current = Pin(canonicalize_name(req.name), specs[0].version, req.marker)
            assert current.name not in pins, f"{current.name} is pinned twice"
            pins[current.name] = current
            in_via = False
            continue
        stripped = line.strip()
        if current is None:
            continue  # the header
        if stripped.startswith("--hash="):
            current.hashes.append(stripped.removeprefix("--hash="))
        elif stripped.startswith("# via"):
            rest = stripped.removeprefix("# via").strip()
            in_via = not rest
            if rest:
                current.via.append(rest)
        elif in_via and stripped.startswith("#"):
            current.via.append(stripped.lstrip("#").strip())
    return pins


def header_python(text: str) -> str | None:
    m = re.search(r"^#.*--python-version (3\.\d+)", text, re.MULTILINE)
    return m.group(1) if m else None


def image_python() -> str:
    m = re.search(r"^FROM python:(3\.\d+)-slim", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert m, "the Dockerfile's FROM is not python:3.X-slim"
    return m.group(1)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_groups(project: dict) -> dict[str, list[Requirement]]:
    """runtime, build (the build backend) and each extra; self-references (egress-sidecar[test]) dropped."""
    groups = {
        "runtime": project["project"].get("dependencies", []),
        "build": project["build-system"]["requires"],
        **{f"extra {k}": v for k, v in project["project"].get("optional-dependencies", {}).items()},
    }
    return {
        group: [r for r in map(Requirement, reqs) if canonicalize_name(r.name) != PROJECT]
        for group, reqs in groups.items()
    }


def _target_env() -> dict[str, str]:
    # The image's platform; the locks are universal, so a requirement that applies elsewhere is
    # resolved too, but only this one is checked for membership.
    return {"python_version": image_python(), "python_full_version": image_python() + ".0",
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def disagreements(requirements: list[Requirement], pins: dict[str, Pin]) -> list[str]:
    """What pyproject.toml asks for that the lock does not pin (or pins outside the range)."""
    problems = []
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate(_target_env()):
            continue
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req} is not in the lock")
        elif not req.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{req} but the lock pins {pin.name}=={pin.version}")
    return problems


def stale_direct_pins(pins: dict[str, Pin], requirements: list[Requirement]) -> list[str]:
    """Pins the lock says come from pyproject.toml that pyproject.toml no longer names."""
    named = {canonicalize_name(r.name) for r in requirements}
    return sorted(n for n, p in pins.items() if f"{PROJECT} (pyproject.toml)" in p.via and n not in named)


RUNTIME_GROUPS = ("runtime", "build")
LOCKS = {RUNTIME_LOCK: RUNTIME_GROUPS, DEV_LOCK: None}  # None: every group


def _groups_for(lock: Path, project: dict) -> list[Requirement]:
    groups = requirement_groups(project)
    wanted = LOCKS[lock] or tuple(groups)
    return [r for g in wanted for r in groups[g]]


@pytest.mark.parametrize("lock", list(LOCKS), ids=lambda p: p.name)
def test_lock_has_every_dependency_of_pyproject(lock: Path) -> None:
    assert lock.is_file(), f"{lock.name} is missing: {FIX}"
    pins = parse_lock(lock.read_text())
    project = pyproject()
    problems = disagreements(_groups_for(lock, project), pins)
    assert not problems, f"{lock.name} disagrees with pyproject.toml: {problems}; {FIX}"
    stale = stale_direct_pins(pins, _groups_for(lock, project))
    assert not stale, f"{lock.name} still pins {stale} for pyproject.toml, which no longer names them; {FIX}"
    assert PROJECT not in pins, "the project itself is installed from the source tree (--no-deps), not the lock"


@pytest.mark.parametrize("lock", list(LOCKS), ids=lambda p: p.name)
def test_every_pin_is_exact_and_hashed(lock: Path) -> None:
    pins = parse_lock(lock.read_text())
    assert len(pins) > 20, f"{lock.name}: suspiciously few pins ({len(pins)})"
    unhashed = [n for n, p in pins.items() if not p.hashes]
    assert not unhashed, f"{lock.name}: no hashes for {unhashed}; {FIX}"
    bad = [h for p in pins.values() for h in p.hashes if not re.fullmatch(r"sha256:[0-9a-f]{64}", h)]
    assert not bad, f"{lock.name}: malformed hashes {bad[:3]}"


def test_dev_lock_pins_the_runtime_like_the_image() -> None:
    """Tests run on exactly the versions the image ships."""
    runtime, dev = parse_lock(RUNTIME_LOCK.read_text()), parse_lock(DEV_LOCK.read_text())
    differ = {n: (p.version, dev[n].version if n in dev else None) for n, p in runtime.items()
              if n not in dev or dev[n].version != p.version}
    assert not differ, f"requirements-dev.lock differs from requirements.lock (image, dev): {differ}; {FIX}"


@pytest.mark.parametrize("lock", list(LOCKS), ids=lambda p: p.name)
def test_lock_is_compiled_for_the_image_python(lock: Path) -> None:
    compiled = header_python(lock.read_text())
    assert compiled, f"{lock.name} does not say which Python it was compiled for (--python-version): {FIX}"
    assert compiled == image_python(), (
        f"{lock.name} was compiled for Python {compiled}, the Dockerfile uses {image_python()}: {FIX}"
    )


def test_tests_run_on_the_image_python() -> None:
    """One Python minor version for the image and the tests (.ci/find-python prefers the image's)."""
    running = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert running == image_python(), (
        f"the tests run on Python {running} but the image is python:{image_python()}-slim: install "
        f"{image_python()} (pyenv install {image_python()}), then `make clean test`"
    )


def test_find_python_prefers_the_image_python() -> None:
    import subprocess

    proc = subprocess.run(["bash", str(ROOT / ".ci" / "find-python")], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    if proc.returncode != 0 or "warning" in proc.stderr:
        pytest.skip(f"no Python {image_python()} outside the venv here: {proc.stderr.strip()}")
    out = subprocess.run([proc.stdout.strip(), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == image_python()


# ----------------------------------------------------------------- the checks above have teeth


def test_checks_catch_an_added_a_removed_and_an_out_of_range_dependency() -> None:
    pins = parse_lock(RUNTIME_LOCK.read_text())
    project = pyproject()
    project["project"]["dependencies"] = [*project["project"]["dependencies"], "tomli-w>=1"]
    assert disagreements(_groups_for(RUNTIME_LOCK, project), pins) == ["tomli-w>=1 is not in the lock"]

    project = pyproject()
    project["project"]["dependencies"] = [d for d in project["project"]["dependencies"] if not d.startswith("h11")]
    assert stale_direct_pins(pins, _groups_for(RUNTIME_LOCK, project)) == ["h11"]

    project = pyproject()
    project["project"]["dependencies"] = [*project["project"]["dependencies"], "mitmproxy>=99"]
    assert any("mitmproxy>=99 but the lock pins" in p for p in disagreements(_groups_for(RUNTIME_LOCK, project), pins))


def test_parser_reads_markers_hashes_and_via() -> None:
    text = (
        "# This file was autogenerated by uv via the following command:\n"
        "#    make lock  (uv pip compile --universal --python-version 3.12 --generate-hashes)\n"
        "colorama==0.4.6 ; sys_platform == 'win32' \\\n"
        "    --hash=sha256:" + "a" * 64 + " \\\n"
        "    --hash=sha256:" + "b" * 64 + "\n"
        "    # via\n"
        "    #   egress-sidecar (pyproject.toml)\n"
        "    #   pytest\n"
        "h11==0.16.0 \\\n"
        "    --hash=sha256:" + "c" * 64 + "\n"
        "    # via egress-sidecar (pyproject.toml)\n"
    )
    pins = parse_lock(text)
    assert header_python(text) == "3.12"
    assert pins["colorama"].version == "0.4.6" and str(pins["colorama"].marker) == 'sys_platform == "win32"'
    assert len(pins["colorama"].hashes) == 2
    assert pins["colorama"].via == ["egress-sidecar (pyproject.toml)", "pytest"]
    assert pins["h11"].via == ["egress-sidecar (pyproject.toml)"]
    with pytest.raises(AssertionError):
        parse_lock("h11>=0.16\n")
