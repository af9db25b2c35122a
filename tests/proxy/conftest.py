"""Fixtures of the proxy's tests: a sidecar running in this process (its front door on a port the kernel
picks), for head parsing and other front-door behaviour that needs no pair: no process to start per case."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.app.demo import BackgroundSidecar
from sidecar.app.service import Sidecar
from sidecar.config import load_settings


@pytest.fixture(scope="module")
def inproc_front_door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """The address of an in-process sidecar's front door (direct mode, default settings otherwise)."""
    confdir: Path = tmp_path_factory.mktemp("inproc") / "confdir"
    settings = load_settings({"SIDECAR_LISTEN": "127.0.0.1:0", "SIDECAR_ADMIN_LISTEN": "127.0.0.1:0",
                              "SIDECAR_CONFDIR": str(confdir)})
    with BackgroundSidecar(Sidecar(settings)) as bg:
        assert bg.sidecar.proxy_address is not None
        yield bg.sidecar.proxy_address
