"""The metrics every exporter is expected to have: build_info, process_* and python_info, on the
sidecar's own registry (one per sidecar; the demo runs two in one process)."""

from __future__ import annotations

import os
import platform
import tomllib
from collections.abc import Callable
from importlib.metadata import version

from prometheus_client.parser import text_string_to_metric_families

import sidecar
from sidecar.metrics import Metrics
from tests.harness import ROOT, SidecarProcess, metric_value


def samples(text: str, name: str) -> list:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def test_counters_read_by_increase_exist_at_zero_from_the_start() -> None:
    """increase() cannot see a series' first step: a retry's or a refusal's first count would be lost if
    its series were born with it."""
    from sidecar.metrics import CONNECTION_REFUSALS, OUTCOMES

    registry = Metrics().registry
    for outcome in OUTCOMES:
        assert registry.get_sample_value("egress_sidecar_ip_restricted_retries_total", {"outcome": outcome}) == 0
    for reason in CONNECTION_REFUSALS:
        assert registry.get_sample_value("egress_sidecar_connections_refused_total", {"reason": reason}) == 0


def test_build_info_names_the_versions() -> None:
    (sample,) = samples(Metrics().render().decode(), "egress_sidecar_build_info")
    assert sample.value == 1
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert sample.labels == {
        "version": sidecar.__version__,
        "python": platform.python_version(),
        "mitmproxy": version("mitmproxy"),
    }
    assert sample.labels["version"] == project


def test_process_and_platform_collectors_are_on_the_sidecars_registry() -> None:
    text = Metrics().render().decode()
    rss = samples(text, "process_resident_memory_bytes")
    assert rss and rss[0].value > 10e6, "process collector missing or not measuring this process"
    for name in ("process_cpu_seconds_total", "process_open_fds", "process_max_fds", "process_start_time_seconds",
                 "process_virtual_memory_bytes"):
        assert samples(text, name), f"{name} missing"
    (info,) = samples(text, "python_info")
    assert info.labels["version"] == platform.python_version()


def test_two_sidecars_in_one_process_each_export_everything() -> None:
    """Registries are per instance: no 'Duplicated timeseries' error, and counts do not mix."""
    a, b = Metrics(), Metrics()
    a.failovers.inc()
    ta, tb = a.render().decode(), b.render().decode()
    for text in (ta, tb):
        assert len(samples(text, "egress_sidecar_build_info")) == 1
        assert samples(text, "process_resident_memory_bytes") and samples(text, "python_info")
    assert metric_value(ta, "egress_sidecar_failovers_total") == 1
    assert metric_value(tb, "egress_sidecar_failovers_total") == 0


def _start_time(pid: int) -> float:
    """A process's start time (epoch seconds), from /proc as the kernel reports it."""
    btime = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def test_running_sidecar_exports_them(make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc()
    text = sc.metrics()
    (info,) = samples(text, "egress_sidecar_build_info")
    assert info.value == 1 and info.labels["version"] == sidecar.__version__
    assert sc.proc is not None
    # The collector measures the sidecar process itself, not whoever imported prometheus-client first.
    start = metric_value(text, "process_start_time_seconds")
    assert abs(start - _start_time(sc.proc.pid)) < 0.5
    assert metric_value(text, "process_resident_memory_bytes") > 10e6
