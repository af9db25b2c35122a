"""Fixtures: a test CA, the simulated world (pair, Salesforce, echo) and the real sidecar process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.sim.certs import TestCA
from tests.harness import (
    SF_HOST,
    SidecarProcess,
    World,
    make_sidecar,
    start_world,
    stop_world,
)
from tests.redis_server import redis_server  # noqa: F401 - a fixture: a real redis-server per test


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("test-ca"))


@pytest.fixture(scope="session")
def sf_cert(test_ca: TestCA) -> tuple[Path, Path]:
    return test_ca.issue([SF_HOST, "test.salesforce.com", "*.my.salesforce.com", "*.my.site.com", "localhost",
                          "127.0.0.1"], "salesforce")


@pytest.fixture
def make_world(sf_cert: tuple[Path, Path]) -> Iterator[Callable[..., World]]:
    worlds: list[World] = []

    def factory(allowlist: tuple[str, ...] = ("127.0.0.2",), n_members: int = 2) -> World:
        world = start_world(sf_cert, allowlist, n_members)
        worlds.append(world)
        return world

    yield factory
    for world in worlds:
        stop_world(world)


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()


@pytest.fixture
def make_sidecar_proc(tmp_path: Path, test_ca: TestCA) -> Iterator[Callable[..., SidecarProcess]]:
    procs: list[SidecarProcess] = []

    def factory(env: dict[str, str] | None = None, *, start: bool = True, wait_ready: bool = True,
                name: str = "sc") -> SidecarProcess:
        base = tmp_path / f"{name}{len(procs)}"
        base.mkdir()
        proc = make_sidecar(base, test_ca.ca_path, env or {})
        procs.append(proc)
        if start:
            proc.start(wait_ready=wait_ready)
        return proc

    yield factory
    for proc in procs:
        proc.stop()
