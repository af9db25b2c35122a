"""Import the parts of mitmproxy the sidecar uses, and nothing else.

``mitmproxy/addons/__init__.py`` imports every default addon (the Flask web app behind
``mitm.it``, ldap3 for LDAP proxy auth, script loading, the flow exporters...) as soon as any
``mitmproxy.addons.<name>`` module is imported. The sidecar adds its own short list of addons, so
it registers the package without running that ``__init__``: about 13 MB less resident memory in
every pod, for code that would never run. Import mitmproxy addons through this module only.

Both things done here lean on mitmproxy internals (the package layout of ``mitmproxy.addons`` and
``Master._legacy_log_events``); pyproject pins mitmproxy to the tested major version and
tests/proxy/test_mitm_internals.py fails on an upgrade that breaks either.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType


def _addons_package() -> ModuleType:
    pkg = sys.modules.get("mitmproxy.addons")
    if pkg is not None:  # already imported in full (e.g. by mitmproxy's own tools in a test process)
        return pkg
    spec = importlib.util.find_spec("mitmproxy.addons")
    if spec is None or spec.submodule_search_locations is None:  # pragma: no cover - broken install
        raise ImportError("mitmproxy is not installed correctly: mitmproxy.addons not found")
    pkg = importlib.util.module_from_spec(spec)  # a package object whose __init__ has not run
    sys.modules["mitmproxy.addons"] = pkg
    return pkg


_addons_package()  # before anything below: mitmproxy.master itself imports an addon module

from mitmproxy.master import Master  # noqa: E402

__all__ = ["Master", "addon_module", "new_master"]


def new_master(opts: object) -> Master:
    """A mitmproxy Master without its legacy log bridge: mitmproxy installs a root logging handler that
    formats every log record again and dispatches it to every addon as an ``add_log`` event (~60 us
    per line, one line per token call). The sidecar logs through its own handler only."""
    master = Master(opts)  # type: ignore[arg-type]
    bridge = getattr(master, "_legacy_log_events", None)
    if bridge is not None:
        bridge.uninstall()
    return master


def addon_module(name: str) -> ModuleType:
    """``mitmproxy.addons.<name>``, imported without the package's list of default addons."""
    _addons_package()
    return importlib.import_module(f"mitmproxy.addons.{name}")
