"""Offline checks of deploy/kubernetes/: schemas, wiring between the objects, and the sidecar contract.

No cluster is needed. Built-in kinds are validated against the Kubernetes OpenAPI schemas shipped
by ``kubernetes-validate`` (strict: unknown fields are errors) for the oldest Kubernetes with native
sidecars (1.29) and the newest version the package ships. Prometheus Operator CRDs (PodMonitor,
PrometheusRule), which it does not know, are checked by hand. Then the wiring that no schema can
see: env names are real sidecar settings, probes hit the admin port, the startup probe depends on
nothing but the sidecar listening (checked against a real sidecar whose /readyz is 503), the app's
proxy and CA variables point at what the sidecar really serves, no key (CA key, grants.key) is in a
volume the app mounts, the NetworkPolicy closes the admin port to all but Prometheus, and the
resources leave headroom over the memory the bench measured.

The settings contract is in tests/deploy/contract.py (tests/deploy/test_dockerfile.py uses it too).
"""

from __future__ import annotations

import re
import shlex
import shutil
import ssl
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from sidecar.ops.trust import MITM_CA, install_given_ca
from tests.deploy.contract import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_LISTEN,
    SIDECAR_ENV_CONTRACT,
    host_of,
    port_of,
    sidecar_env_names,
)

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest Kubernetes with native sidecars on by default (SidecarContainers beta, 1.29).
MIN_K8S_VERSION = "1.29.0"

SIDECAR_CONTAINER = "egress-sidecar"
CA_SECRET = "egress-sidecar-ca"
QUOTAGUARD_SECRET = "quotaguard"
CONFIGMAP = "egress-sidecar"
# Files the sidecar writes into SIDECAR_TRUST_DIR (default: SIDECAR_CONFDIR) for apps to trust it.
CA_BUNDLE_FILE = "ca-bundle.pem"
BENCH_RESULTS = ROOT / "bench" / "RESULTS.md"

def test_settings_model_has_every_contract_name():
    """The agreed names (used in manifests and docs) are what the sidecar really reads."""
    missing = SIDECAR_ENV_CONTRACT - sidecar_env_names()
    assert not missing, f"settings in the contract but not in sidecar.config.Settings: {sorted(missing)}"


# --------------------------------------------------------------------------------- manifest loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_yaml_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.load_all(path.read_text(), Loader=_StrictLoader) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
    return docs


MANIFEST_FILES = sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def all_objects() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in MANIFEST_FILES for doc in load_yaml_docs(p)]


def find(kind: str, name: str | None = None) -> dict:
    hits = [
        doc
        for _, doc in all_objects()
        if doc.get("kind") == kind and (name is None or doc.get("metadata", {}).get("name") == name)
    ]
    assert len(hits) == 1, f"expected exactly one {kind} {name or ''} in {K8S_DIR}, found {len(hits)}"
    return hits[0]


@pytest.fixture(scope="module")
def deployment() -> dict:
    return find("Deployment")


@pytest.fixture(scope="module")
def pod_spec(deployment) -> dict:
    return deployment["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def sidecar(pod_spec) -> dict:
    hits = [c for c in pod_spec.get("initContainers", []) if c["name"] == SIDECAR_CONTAINER]
    assert len(hits) == 1, f"no initContainer named {SIDECAR_CONTAINER!r}"
    return hits[0]


@pytest.fixture(scope="module")
def app_containers(pod_spec) -> list[dict]:
    assert pod_spec["containers"], "the Deployment has no app container"
    return pod_spec["containers"]


def env_map(container: dict) -> dict[str, dict]:
    """name -> the env entry (with ``value`` or ``valueFrom``)."""
    return {e["name"]: e for e in container.get("env", [])}


def literal_env(container: dict, name: str) -> str | None:
    entry = env_map(container).get(name)
    return None if entry is None else entry.get("value")


def dockerfile_env() -> dict[str, str]:
    """ENV defaults baked into the image (the sidecar sees them unless the pod overrides them)."""
    env: dict[str, str] = {}
    logical = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in logical.splitlines():
        line = line.strip()
        if not line.upper().startswith("ENV "):
            continue
        for token in shlex.split(line[4:]):
            key, sep, value = token.partition("=")
            assert sep, f"use ENV KEY=VALUE form in the Dockerfile: {line!r}"
            env[key] = value
    return env


def sidecar_setting(sidecar: dict, name: str, default: str) -> str:
    """The value the sidecar process sees: pod env, else the image ENV, else the app default."""
    value = literal_env(sidecar, name)
    if value is not None:
        return value
    return dockerfile_env().get(name, default)


def resolve_mount(container: dict, pod_spec: dict, path: str) -> tuple[dict, PurePosixPath, dict]:
    """Which volume (and which file inside it) a container sees at ``path``."""
    p = PurePosixPath(path)
    best = None
    for mount in container.get("volumeMounts", []):
        mp = PurePosixPath(mount["mountPath"])
        if p == mp or mp in p.parents:
            if best is None or len(mp.parts) > len(PurePosixPath(best["mountPath"]).parts):
                best = mount
    assert best is not None, f"{container['name']}: {path} is on no volume mount"
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    assert best["name"] in volumes, f"volumeMount {best['name']!r} has no volume"
    rel = p.relative_to(best["mountPath"])
    if best.get("subPath"):
        rel = PurePosixPath(best["subPath"]) / rel
    return volumes[best["name"]], rel, best


def secret_key_at(container: dict, pod_spec: dict, path: str) -> tuple[str, str]:
    """(secretName, key) of the Secret file a container sees at ``path``."""
    volume, rel, _ = resolve_mount(container, pod_spec, path)
    assert "secret" in volume, f"{path} is not on a Secret volume"
    secret = volume["secret"]
    items = secret.get("items")
    if items is None:
        return secret["secretName"], str(rel)
    keys = [i["key"] for i in items if PurePosixPath(i["path"]) == rel]
    assert keys, f"{path}: no item of Secret volume {volume['name']!r} is projected at {rel}"
    return secret["secretName"], keys[0]


# ------------------------------------------------------------------------------------ schema checks

CRD_KINDS = {"PodMonitor", "PrometheusRule"}


def k8s_versions() -> list[str]:
    from kubernetes_validate import utils

    latest = utils.latest_version()
    assert utils.major_minor(MIN_K8S_VERSION) in {utils.major_minor(v) for v in utils.all_versions()}, (
        f"kubernetes-validate {utils.__version__} does not ship schemas for {MIN_K8S_VERSION}"
    )
    return [MIN_K8S_VERSION, latest]


def test_manifest_directory_is_complete():
    names = {p.name for p in K8S_DIR.glob("*.yaml")}
    for required in (
        "deployment.yaml",
        "configmap.yaml",
        "secret-example.yaml",
        "podmonitor.yaml",
        "kustomization.yaml",
        "networkpolicy.yaml",
    ):
        assert required in names, f"deploy/kubernetes/{required} is missing"


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_manifest_is_valid(path: Path):
    """Every object validates against the Kubernetes schemas (strict) or, for CRDs, by hand."""
    try:
        from kubernetes_validate import utils
    except ImportError:  # pragma: no cover - a missing test dependency is a failure, not a skip
        pytest.fail("kubernetes-validate is not installed: pip install -e '.[test]'")
    docs = load_yaml_docs(path)
    assert docs, f"{path.name} has no objects"
    for doc in docs:
        for field in ("apiVersion", "kind", "metadata"):
            assert field in doc, f"{path.name}: an object has no {field}"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"].get("name", "")), (
            f"{path.name}: {doc['kind']} has no valid metadata.name"
        )
        assert "namespace" not in doc["metadata"], (
            f"{path.name}: leave the namespace to kubectl/kustomize (-n / namespace:)"
        )
        if doc["kind"] in CRD_KINDS:
            CRD_CHECKS[doc["kind"]](doc)
            continue
        for version in k8s_versions():
            try:
                utils.validate(doc, version, strict=True)
            except utils.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                name = f"{doc['kind']}/{doc['metadata']['name']}"
                pytest.fail(f"{path.name}: {name} invalid for Kubernetes {version}: {where}: {exc.message}")
            except utils.SchemaNotFoundError as exc:
                pytest.fail(f"{path.name}: {exc.message}")


# Prometheus durations, as in the Prometheus Operator CRDs.
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def _seconds(duration: str) -> float:
    units = {"y": 31536000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|y|w|d|h|m|s)", duration))


def check_podmonitor(doc: dict) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    spec = doc.get("spec")
    assert isinstance(spec, dict), "PodMonitor needs a spec"
    selector = spec.get("selector")
    assert isinstance(selector, dict) and (selector.get("matchLabels") or selector.get("matchExpressions")), (
        "PodMonitor needs spec.selector.matchLabels/matchExpressions (an empty selector scrapes every pod)"
    )
    endpoints = spec.get("podMetricsEndpoints")
    assert isinstance(endpoints, list) and endpoints, "PodMonitor needs spec.podMetricsEndpoints"
    for ep in endpoints:
        assert isinstance(ep, dict)
        assert isinstance(ep.get("port"), str) and ep["port"], "scrape by port *name* (spec.podMetricsEndpoints[].port)"
        assert str(ep.get("path", "/metrics")).startswith("/")
        for key in ("interval", "scrapeTimeout"):
            if key in ep:
                assert DURATION.match(str(ep[key])) and ep[key] != "", f"{key}={ep[key]!r} is not a duration"
        if "interval" in ep and "scrapeTimeout" in ep:
            assert _seconds(ep["scrapeTimeout"]) <= _seconds(ep["interval"]), "scrapeTimeout > interval"
        for rule in ep.get("relabelings", []):
            assert isinstance(rule, dict) and set(rule) <= RELABEL_KEYS, f"unknown relabeling fields: {rule}"
            assert rule.get("action", "replace") in RELABEL_ACTIONS, rule
            if "targetLabel" in rule:
                assert LABEL_NAME.match(rule["targetLabel"]), rule
            for source in rule.get("sourceLabels", []):
                assert LABEL_NAME.match(source), rule
            re.compile(rule.get("regex", "(.*)"))  # Prometheus anchors it; it must at least compile


# The RelabelConfig fields of the Prometheus Operator's monitoring.coreos.com/v1 API.
RELABEL_KEYS = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}
RELABEL_ACTIONS = {"replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase",
                   "uppercase", "keepequal", "dropequal", "Replace", "Keep", "Drop"}


def check_prometheusrule(doc: dict) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    groups = (doc.get("spec") or {}).get("groups")
    assert isinstance(groups, list) and groups, "PrometheusRule needs spec.groups"
    group_names = [g.get("name") for g in groups]
    assert all(isinstance(n, str) and n for n in group_names), "every rule group needs a name"
    assert len(set(group_names)) == len(group_names), "rule group names must be unique"
    for group in groups:
        rules = group.get("rules")
        assert isinstance(rules, list) and rules, f"group {group['name']!r} has no rules"
        if "interval" in group:
            assert DURATION.match(str(group["interval"]))
        for rule in rules:
            assert ("alert" in rule) != ("record" in rule), f"a rule needs exactly one of alert/record: {rule}"
            assert isinstance(rule.get("expr"), (str, int)) and str(rule["expr"]).strip(), f"rule without expr: {rule}"
            if "record" in rule:
                assert METRIC_NAME.match(rule["record"]), f"bad record name {rule['record']!r}"
                assert "for" not in rule and "annotations" not in rule, "recording rules take no for/annotations"
            else:
                assert isinstance(rule["alert"], str) and rule["alert"], "alert name must be a string"
            if "for" in rule:
                assert DURATION.match(str(rule["for"])), f"for={rule['for']!r} is not a duration"
            for key in ("labels", "annotations"):
                for name, value in (rule.get(key) or {}).items():
                    assert LABEL_NAME.match(name), f"bad {key} name {name!r}"
                    assert isinstance(value, str), f"{key}.{name} must be a string (quote it)"


CRD_CHECKS = {"PodMonitor": check_podmonitor, "PrometheusRule": check_prometheusrule}


def test_validator_rejects_a_broken_manifest():
    """The schema check is not a no-op: a typo'd field and a wrong type are caught."""
    from kubernetes_validate import utils

    bad = find("Deployment")
    bad = yaml.safe_load(yaml.safe_dump(bad))
    bad["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(utils.ValidationError):
        utils.validate(bad, MIN_K8S_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(find("Deployment")))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(utils.ValidationError):
        utils.validate(bad, MIN_K8S_VERSION, strict=True)


def test_yaml_loader_rejects_duplicate_keys(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("a: 1\na: 2\n")
    with pytest.raises(yaml.constructor.ConstructorError):
        load_yaml_docs(f)


# ------------------------------------------------------------------------------------ kustomization


def test_kustomization_resources_exist_and_cover_the_manifests():
    kust = load_yaml_docs(K8S_DIR / "kustomization.yaml")
    assert len(kust) == 1
    kust = kust[0]
    assert kust.get("apiVersion") == "kustomize.config.k8s.io/v1beta1"
    assert kust.get("kind") == "Kustomization"
    resources = kust.get("resources")
    assert isinstance(resources, list) and resources
    assert len(set(resources)) == len(resources), "a resource is listed twice"
    missing = [r for r in resources if not (K8S_DIR / r).is_file()]
    assert not missing, f"kustomization.yaml lists resources that do not exist: {missing}"
    # Placeholder secrets must never be applied over the real ones by `kubectl apply -k`.
    assert "secret-example.yaml" not in resources
    expected = {p.name for p in MANIFEST_FILES} - {"secret-example.yaml"}
    assert expected <= set(resources), f"manifests not in kustomization.yaml: {sorted(expected - set(resources))}"
    assert "prometheusrule.yaml" in resources
    for key in ("commonLabels", "bases", "patchesStrategicMerge", "patchesJson6902", "vars"):
        assert key not in kust, f"{key} is deprecated in kustomize v5"


def test_kustomization_images_match_the_deployment(pod_spec):
    kust = load_yaml_docs(K8S_DIR / "kustomization.yaml")[0]
    images = [c["image"] for c in pod_spec.get("initContainers", []) + pod_spec["containers"]]
    for entry in kust.get("images", []):
        assert any(i == entry["name"] or i.startswith(entry["name"] + ":") for i in images), (
            f"kustomization images entry {entry['name']!r} matches no container image"
        )


# --------------------------------------------------------------------------------- the native sidecar


def test_sidecar_is_a_native_sidecar(pod_spec, sidecar):
    assert sidecar.get("restartPolicy") == "Always", "native sidecar = initContainer with restartPolicy: Always"
    assert SIDECAR_CONTAINER not in [c["name"] for c in pod_spec["containers"]]
    # It must be started before anything that may call out, i.e. be the first init container.
    assert pod_spec["initContainers"][0]["name"] == SIDECAR_CONTAINER


def test_sidecar_ports_match_its_listen_settings(sidecar):
    ports = {p["name"]: p["containerPort"] for p in sidecar.get("ports", [])}
    listen = sidecar_setting(sidecar, "SIDECAR_LISTEN", DEFAULT_LISTEN)
    admin = sidecar_setting(sidecar, "SIDECAR_ADMIN_LISTEN", DEFAULT_ADMIN_LISTEN)
    assert ports.get("admin") == port_of(admin), f"containerPort 'admin' must be the admin listen port ({admin})"
    assert ports.get("proxy") == port_of(listen), f"containerPort 'proxy' must be the proxy listen port ({listen})"
    # Probes come from the kubelet via the pod IP: the admin server must not be loopback-only.
    assert host_of(admin) in ("0.0.0.0", "::", ""), f"SIDECAR_ADMIN_LISTEN={admin} is unreachable for probes"
    # The proxy must not be reachable from outside the pod (no auth in this example).
    assert host_of(listen) in ("127.0.0.1", "::1", "localhost"), f"SIDECAR_LISTEN={listen} exposes the proxy"


@pytest.mark.parametrize(("probe", "path"), [("readinessProbe", "/serving"), ("livenessProbe", "/healthz")])
def test_sidecar_probes_use_the_admin_port(sidecar, probe, path):
    spec = sidecar.get(probe)
    assert spec, f"the sidecar has no {probe}"
    get = spec.get("httpGet")
    assert get and get.get("path") == path, f"{probe} must be an httpGet on {path}"
    admin_port = port_of(sidecar_setting(sidecar, "SIDECAR_ADMIN_LISTEN", DEFAULT_ADMIN_LISTEN))
    ports = {p["name"]: p["containerPort"] for p in sidecar.get("ports", [])}
    port = ports.get(get["port"], get["port"]) if isinstance(get["port"], str) else get["port"]
    assert port == admin_port, f"{probe} must hit the admin port {admin_port}, not {get['port']}"
    assert get.get("scheme", "HTTP") == "HTTP"


def test_readiness_probe_does_not_depend_on_quotaguard(sidecar):
    """/readyz is 503 while QuotaGuard (or the IP echo) is down with the guard enforcing. A native sidecar's
    readiness is the pod's: as the readiness probe it would take every replica of the app out of its
    Service during an upstream outage, although the app's inbound traffic does not need the upstream."""
    path = sidecar["readinessProbe"]["httpGet"]["path"]
    assert path != "/readyz", "the readiness probe must not be /readyz (it reflects QuotaGuard and the allowlist)"
    from sidecar.ops.admin import ENDPOINTS

    assert path in ENDPOINTS, f"the readiness probe asks {path}, which the admin server does not serve"


def test_startup_probe_is_not_readiness(sidecar):
    """/readyz is 503 in enforce mode while the echo is unreachable or no egress IP is allowlisted: as
    the startup probe it would keep the app from ever starting and restart the sidecar in a loop."""
    startup = sidecar["startupProbe"]
    assert "httpGet" not in startup, "the startup probe must not be an admin endpoint that reflects the pair"
    assert startup_probe_argv(sidecar), "the startup probe is an exec probe (the proxy listens on loopback)"


def startup_probe_argv(sidecar: dict) -> list[str]:
    argv = sidecar["startupProbe"].get("exec", {}).get("command")
    assert isinstance(argv, list) and argv and argv[0] == "python", "startupProbe: exec python -c ..."
    return argv


def run_startup_probe(sidecar: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The manifest's startup probe command, run as the kubelet would inside the sidecar container
    (``python`` is the image's interpreter; here the one running the tests)."""
    argv = startup_probe_argv(sidecar)
    return subprocess.run([sys.executable, *argv[1:]], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                          text=True, timeout=30)


def test_startup_probe_needs_the_proxy_listening_and_the_bundle(sidecar, tmp_path):
    """The probe fails with nothing listening, fails while ca-bundle.pem is missing, passes with both."""
    import socket

    trust = tmp_path / "trust"
    trust.mkdir()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        env = {"SIDECAR_LISTEN": f"127.0.0.1:{port}", "SIDECAR_TRUST_DIR": str(trust)}
        assert run_startup_probe(sidecar, env).returncode != 0, "passed with nothing listening"
        srv.listen()
        assert run_startup_probe(sidecar, env).returncode != 0, "passed without ca-bundle.pem"
        (trust / CA_BUNDLE_FILE).write_text("-----BEGIN CERTIFICATE-----\n")
        proc = run_startup_probe(sidecar, env)
        assert proc.returncode == 0, proc.stderr
        # SIDECAR_TRUST_DIR unset: the setting's default, the confdir; a wildcard listen is asked on loopback.
        proc = run_startup_probe(sidecar, {"SIDECAR_LISTEN": f"0.0.0.0:{port}", "SIDECAR_CONFDIR": str(trust)})
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("outage", ["echo_unreachable", "egress_not_allowlisted"])
def test_startup_probe_passes_while_readyz_is_503(sidecar, make_world, make_sidecar_proc, outage):
    """A real sidecar in enforce mode with the IP echo down, or with an allowlist that holds neither
    egress IP: /readyz stays 503, yet the manifest's startup probe passes (so the app starts and the
    sidecar is not restarted) and the endpoints of its liveness and readiness probes are 200 (so it
    is not restarted and the pod stays in its Service)."""
    import urllib.error
    import urllib.request

    from tests.harness import free_port, wait_until

    world = make_world(allowlist=("127.0.0.2", "127.0.0.3"))
    env = {**world.pair_env(), "SIDECAR_GUARD": "enforce", "SIDECAR_ALLOWLIST": "127.0.0.2,127.0.0.3"}
    if outage == "echo_unreachable":
        env["SIDECAR_ECHO_URL"] = f"http://127.0.0.1:{free_port()}/"
    else:
        env["SIDECAR_ALLOWLIST"] = "192.0.2.10,192.0.2.11"
    sc = make_sidecar_proc(env, wait_ready=False)
    probe_env = {"SIDECAR_LISTEN": f"127.0.0.1:{sc.proxy_port}", "SIDECAR_CONFDIR": sc.env["SIDECAR_CONFDIR"]}
    assert wait_until(lambda: run_startup_probe(sidecar, probe_env).returncode == 0, timeout=30, interval=0.2), (
        f"startup probe never passed:\n{run_startup_probe(sidecar, probe_env).stderr}\n{sc.log_text()[-3000:]}"
    )
    if outage == "egress_not_allowlisted":  # a probe round has run: the IPs are known, and not allowlisted
        assert wait_until(sc.egress_discovered, timeout=30), sc.status()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(sc.admin_url + "/readyz", timeout=5)
    assert info.value.code == 503
    for probe in ("livenessProbe", "readinessProbe"):  # neither restarts the sidecar nor takes the pod out
        with urllib.request.urlopen(sc.admin_url + sidecar[probe]["httpGet"]["path"], timeout=5) as resp:
            assert resp.status == 200, probe
    assert sc.proc is not None and sc.proc.poll() is None


def test_startup_probe_gives_the_sidecar_time(sidecar):
    """The app waits for the startup probe; it must allow for a slow first pair probe."""
    s = sidecar["startupProbe"]
    budget = s.get("periodSeconds", 10) * s.get("failureThreshold", 3)
    assert 30 <= budget <= 300, f"startup budget {budget}s: too short to probe the pair, or hides a dead sidecar"


def test_sidecar_resources_and_security(pod_spec, sidecar):
    res = sidecar.get("resources", {})
    assert res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory")
    assert res.get("limits", {}).get("memory"), "set a memory limit"
    mem = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}

    def to_bytes(q: str) -> int:
        m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", q)
        assert m, f"use Ki/Mi/Gi memory quantities: {q}"
        return int(m.group(1)) * mem[m.group(2)]

    assert to_bytes(res["limits"]["memory"]) >= to_bytes(res["requests"]["memory"])
    sc = sidecar.get("securityContext", {})
    assert sc.get("runAsNonRoot") is True
    assert sc.get("readOnlyRootFilesystem") is True
    assert sc.get("allowPrivilegeEscalation") is False
    assert "ALL" in sc.get("capabilities", {}).get("drop", [])
    # The pod's uid must be the image's non-root user.
    user = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("USER ")]
    assert user, "the Dockerfile sets no USER"
    uid = user[-1].split(":")[0]
    assert uid.isdigit(), "USER must be numeric so that runAsNonRoot can be verified"
    assert str(sc.get("runAsUser", uid)) == uid
    # The key is mode 0440 group-owned by fsGroup; it must be the sidecar's group.
    gid = user[-1].split(":")[1] if ":" in user[-1] else uid
    assert str(pod_spec.get("securityContext", {}).get("fsGroup")) == gid


MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
# A memory limit must leave this much room over the largest RSS the bench measured.
LIMIT_HEADROOM = 1.5


def memory_bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert m, f"use Ki/Mi/Gi memory quantities: {quantity}"
    return int(m.group(1)) * MEMORY_UNITS[m.group(2)]


def bench_memory() -> tuple[str, float]:
    """(when the recorded `make bench` run was generated, its largest RSS in bytes) from
    bench/RESULTS.md: the largest figure of the sidecar memory table, peak (VmHWM) column included."""
    text = BENCH_RESULTS.read_text()
    when = re.search(r"^Generated by `python -m bench` on (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", text, re.MULTILINE)
    assert when, "bench/RESULTS.md does not say when its run was generated"
    section = text.split("## Sidecar memory and start", 1)[1].split("\n## ", 1)[0]
    assert "MB = 10⁶ bytes" in section, "the memory table's unit changed: re-read it"
    figures = [float(x) for row in re.findall(r"^\|[^|\n]+\|([^\n]+)$", section, re.MULTILINE)
               for x in re.findall(r"\|\s*([\d.]+)\s*(?=\|)", "|" + row)]
    assert len(figures) >= 6, f"no memory figures found in bench/RESULTS.md: {figures}"
    return when.group(1), max(figures) * 1e6


def test_memory_comes_from_the_bench_with_headroom(sidecar):
    """Requests cover the recorded run's peak, the limit leaves headroom, the comment names the run."""
    when, peak = bench_memory()
    res = sidecar["resources"]
    request, limit = memory_bytes(res["requests"]["memory"]), memory_bytes(res["limits"]["memory"])
    assert request >= peak, f"memory request {res['requests']['memory']} is below the measured {peak / 1e6:.1f} MB"
    assert limit >= LIMIT_HEADROOM * peak, (
        f"memory limit {res['limits']['memory']} leaves less than {LIMIT_HEADROOM}x the measured {peak / 1e6:.1f} MB"
    )
    text = (K8S_DIR / "deployment.yaml").read_text()
    assert f"generated {when}" in text, (
        f"deployment.yaml's resources comment must name the bench run they come from ({when}); "
        "after a new `make bench`, re-check the figures and update it"
    )


def test_bench_parser_reads_the_table():
    when, peak = bench_memory()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", when)
    assert 10e6 < peak < 10e9  # a figure in MB, converted


def test_confdir_is_private_to_the_sidecar(pod_spec, sidecar, app_containers):
    """The confdir holds the CA key (mitmproxy-ca.pem) and grants.key: a writable emptyDir that no
    other container mounts."""
    confdir = sidecar_setting(sidecar, "SIDECAR_CONFDIR", "")
    assert confdir.startswith("/"), "SIDECAR_CONFDIR must be set (image ENV or pod env) to an absolute path"
    volume, rel, mount = resolve_mount(sidecar, pod_spec, confdir)
    assert str(rel) == "." and not mount.get("readOnly"), "the confdir must be the root of a writable mount"
    assert "emptyDir" in volume, "the confdir must be an emptyDir (the root filesystem is read-only)"
    for app in app_containers:
        assert volume["name"] not in {m["name"] for m in app.get("volumeMounts", [])}, (
            f"{app['name']} mounts the sidecar's confdir ({volume['name']}): it holds the CA key and grants.key"
        )


AUDIT_BYTES_PER_RECORD = 256  # measured: 200,000 records of 500 orgs took 51 MB (audit.sqlite3 with its indexes)
GRANT_STATE_BYTES = 16 * 1024 * 1024  # grants.sqlite3 at its 50,000-grant bound, the CA and the keys, with room


def test_the_audit_trail_fits_the_confdir(pod_spec, sidecar):
    """An emptyDir past its sizeLimit gets the pod evicted: the audit trail's bound must fit beside the grants."""
    confdir = sidecar_setting(sidecar, "SIDECAR_CONFDIR", "")
    volume, _, _ = resolve_mount(sidecar, pod_spec, confdir)
    limit = volume["emptyDir"]["sizeLimit"]
    assert limit.endswith("Mi"), limit
    rows = int(sidecar_setting(sidecar, "SIDECAR_AUDIT_MAX_ROWS", "2000000"))
    assert rows * AUDIT_BYTES_PER_RECORD * 1.2 + GRANT_STATE_BYTES <= int(limit[:-2]) * 1024 * 1024, (rows, limit)


def test_trust_dir_is_its_own_volume_shared_read_only(pod_spec, sidecar, app_containers):
    confdir = sidecar_setting(sidecar, "SIDECAR_CONFDIR", "")
    trust = literal_env(sidecar, "SIDECAR_TRUST_DIR")
    assert trust and trust.startswith("/"), "set SIDECAR_TRUST_DIR: the app may see the trust files, not the confdir"
    volume, rel, mount = resolve_mount(sidecar, pod_spec, trust)
    assert str(rel) == "." and not mount.get("readOnly") and "emptyDir" in volume
    assert volume["name"] != resolve_mount(sidecar, pod_spec, confdir)[0]["name"], (
        "SIDECAR_TRUST_DIR must be a different volume from the confdir"
    )
    for app in app_containers:
        shared = [m for m in app.get("volumeMounts", []) if m["name"] == volume["name"]]
        assert shared and all(m.get("readOnly") is True for m in shared), (
            f"{app['name']} must mount {volume['name']!r} read-only"
        )


def key_volumes(pod_spec: dict, sidecar: dict) -> dict[str, str]:
    """Volumes that hold a key, with why: the confdir (CA key, grants.key) and any Secret or projected
    volume that carries the CA Secret's tls.key."""
    from sidecar.ops.trust import MITM_CA
    from sidecar.state.sqlite import KEY_FILE

    out = {resolve_mount(sidecar, pod_spec, sidecar_setting(sidecar, "SIDECAR_CONFDIR", ""))[0]["name"]:
           f"the confdir ({MITM_CA}, {KEY_FILE})"}
    for v in pod_spec.get("volumes", []):
        sources = [v["secret"]] if "secret" in v else [s["secret"] for s in v.get("projected", {}).get("sources", [])
                                                       if "secret" in s]
        for secret in sources:
            name = secret.get("secretName") or secret.get("name")
            items = secret.get("items")
            if name == CA_SECRET and (items is None or "tls.key" in {i["key"] for i in items}):
                out[v["name"]] = f"Secret {CA_SECRET} with tls.key"
    return out


def test_app_cannot_read_the_sidecar_keys(pod_spec, sidecar, app_containers):
    """Whatever user the app runs as (root too), no key is in its filesystem: the key volumes are
    mounted into the sidecar only, and nothing else opens a way into the sidecar's files."""
    keys = key_volumes(pod_spec, sidecar)
    assert len(keys) >= 2, f"expected the confdir and the CA Secret volume, found {keys}"
    for app in app_containers + [c for c in pod_spec.get("initContainers", []) if c["name"] != SIDECAR_CONTAINER]:
        for mount in app.get("volumeMounts", []):
            assert mount["name"] not in keys, f"{app['name']} mounts {mount['name']}: {keys[mount['name']]}"
    # A shared process namespace would let the app read /proc/<sidecar pid>/root/...; hostPath would
    # let it reach the node's copy of the volumes.
    assert pod_spec.get("shareProcessNamespace") is not True
    assert not [v["name"] for v in pod_spec.get("volumes", []) if "hostPath" in v]


def test_key_check_has_teeth(pod_spec, sidecar):
    bad = yaml.safe_load(yaml.safe_dump(pod_spec))
    app = bad["containers"][0]
    confdir_volume = resolve_mount(sidecar, pod_spec, sidecar_setting(sidecar, "SIDECAR_CONFDIR", ""))[0]["name"]
    app.setdefault("volumeMounts", []).append({"name": confdir_volume, "mountPath": "/x", "readOnly": True})
    with pytest.raises(AssertionError, match="confdir"):
        test_app_cannot_read_the_sidecar_keys(bad, sidecar, bad["containers"])


def test_sidecar_uses_the_ca_from_the_secret(pod_spec, sidecar):
    cert = literal_env(sidecar, "SIDECAR_CA_CERT")
    key = literal_env(sidecar, "SIDECAR_CA_KEY")
    assert cert and key, "set SIDECAR_CA_CERT and SIDECAR_CA_KEY so every replica presents the same CA"
    assert secret_key_at(sidecar, pod_spec, cert) == (CA_SECRET, "tls.crt")
    assert secret_key_at(sidecar, pod_spec, key) == (CA_SECRET, "tls.key")
    volume, _, mount = resolve_mount(sidecar, pod_spec, key)
    assert mount.get("readOnly") is True
    mode = volume["secret"].get("defaultMode", 0o644)
    assert mode & 0o007 == 0, f"the CA key must not be world-readable (defaultMode {oct(mode)})"


def test_app_never_sees_the_ca_key(pod_spec, app_containers):
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for app in app_containers:
        for mount in app.get("volumeMounts", []):
            secret = volumes[mount["name"]].get("secret")
            if not secret or secret["secretName"] != CA_SECRET:
                continue
            items = secret.get("items")
            assert items is not None, f"{app['name']}: mounting all of {CA_SECRET} would expose tls.key"
            assert {i["key"] for i in items} == {"tls.crt"}, f"{app['name']} may only get tls.crt"
        for env in app.get("env", []) + [e for e in app.get("envFrom", [])]:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef") or env.get("secretRef")
            assert not (ref and ref.get("name") == CA_SECRET), f"{app['name']} reads {CA_SECRET} via env"


def test_sidecar_secrets_and_config_come_from_references(sidecar):
    env = env_map(sidecar)
    ref = env["QUOTAGUARDSTATIC_URL"].get("valueFrom", {}).get("secretKeyRef")
    assert ref == {"name": QUOTAGUARD_SECRET, "key": "QUOTAGUARDSTATIC_URL"}, (
        "QUOTAGUARDSTATIC_URL must come from the Secret"
    )
    for name in ("SIDECAR_ALLOWLIST", "SIDECAR_GUARD"):
        ref = env[name].get("valueFrom", {}).get("configMapKeyRef")
        assert ref and ref["name"] == CONFIGMAP, f"{name} must come from ConfigMap {CONFIGMAP}"


def test_every_reference_resolves():
    """Every configMapKeyRef/secretKeyRef/volume points at an object and key defined here."""
    objects = all_objects()
    data: dict[tuple[str, str], set[str]] = {}
    for _, doc in objects:
        if doc["kind"] in ("ConfigMap", "Secret"):
            keys = set(doc.get("data", {})) | set(doc.get("stringData", {}))
            data[(doc["kind"], doc["metadata"]["name"])] = keys
    dep = find("Deployment")
    spec = dep["spec"]["template"]["spec"]
    for c in spec.get("initContainers", []) + spec["containers"]:
        names = [e["name"] for e in c.get("env", [])]
        assert len(names) == len(set(names)), f"{c['name']}: duplicate env names"
        for e in c.get("env", []):
            vf = e.get("valueFrom", {})
            for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                if field in vf:
                    ref = vf[field]
                    assert ref["key"] in data.get((kind, ref["name"]), set()), (
                        f"{c['name']}: {e['name']} refers to missing {kind} {ref['name']}/{ref['key']}"
                    )
    for v in spec.get("volumes", []):
        if "secret" in v:
            keys = data.get(("Secret", v["secret"]["secretName"]))
            assert keys is not None, f"volume {v['name']}: Secret {v['secret']['secretName']} is not defined"
            for item in v["secret"].get("items", []):
                assert item["key"] in keys, f"volume {v['name']}: Secret has no key {item['key']}"
    ca = find("Secret", CA_SECRET)
    assert ca.get("type") == "kubernetes.io/tls", "create it with `kubectl create secret tls`"


def test_env_names_are_sidecar_settings():
    known = sidecar_env_names()
    used: list[tuple[str, str]] = []
    for fname, doc in all_objects():
        if doc["kind"] == "ConfigMap":
            used += [(fname, k) for k in doc.get("data", {})]
        if doc["kind"] == "Secret":
            used += [(fname, k) for k in list(doc.get("data", {})) + list(doc.get("stringData", {}))]
        spec = (doc.get("spec") or {}).get("template", {}).get("spec", {})
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            used += [(fname, e["name"]) for e in c.get("env", [])]
    relevant = [(f, n) for f, n in used if n.startswith("SIDECAR_") or n == "QUOTAGUARDSTATIC_URL"]
    assert relevant, "no sidecar settings found in the manifests"
    unknown = sorted({f"{f}: {n}" for f, n in relevant if n not in known})
    assert not unknown, f"not settings of the sidecar (typo or renamed?): {unknown}"


def test_sidecar_configuration_is_accepted_by_the_sidecar(sidecar):
    """The sidecar's effective environment (image ENV + pod env + ConfigMap + example Secret)
    passes the sidecar's own validation, e.g. SIDECAR_GUARD=enforce without an allowlist fails."""
    from sidecar.config import load_settings

    env = dict(dockerfile_env())
    for name, entry in env_map(sidecar).items():
        if "value" in entry:
            env[name] = entry["value"]
            continue
        vf = entry["valueFrom"]
        if "configMapKeyRef" in vf:
            ref = vf["configMapKeyRef"]
            env[name] = find("ConfigMap", ref["name"])["data"][ref["key"]]
        elif "secretKeyRef" in vf:
            ref = vf["secretKeyRef"]
            env[name] = find("Secret", ref["name"])["stringData"][ref["key"]]
    # Files that only exist inside the pod (checked above to be the Secret's tls.crt/tls.key).
    for name in ("SIDECAR_CA_CERT", "SIDECAR_CA_KEY", "SIDECAR_UPSTREAM_CA"):
        env.pop(name, None)
    settings = load_settings(env)
    assert settings.upstream is not None, "the example must configure the QuotaGuard upstream"


def test_app_env_points_at_the_sidecar(sidecar, app_containers):
    listen = sidecar_setting(sidecar, "SIDECAR_LISTEN", DEFAULT_LISTEN)
    host, port = host_of(listen), port_of(listen)
    for app in app_containers:
        env = {name: literal_env(app, name) for name in env_map(app)}
        assert env.get("HTTPS_PROXY"), f"{app['name']} has no HTTPS_PROXY"
        for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
            if name not in env:
                continue
            url = urlsplit(env[name])
            assert url.scheme == "http", f"{name}: the sidecar is a plain-HTTP proxy (http://, CONNECT for TLS)"
            assert (url.hostname, url.port) == (host, port), f"{name}={env[name]} is not the sidecar at {listen}"
        for name in ("NO_PROXY", "no_proxy"):
            if name in env:
                entries = {e.strip() for e in env[name].split(",")}
                assert {"localhost", "127.0.0.1"} <= entries, f"{name} must bypass loopback"
        assert env.get("NO_PROXY"), "set NO_PROXY so in-cluster and loopback traffic skips the proxy"
        if "no_proxy" in env:
            assert env["no_proxy"] == env["NO_PROXY"]


def test_app_trusts_the_sidecar_ca(pod_spec, sidecar, app_containers):
    trust = literal_env(sidecar, "SIDECAR_TRUST_DIR") or sidecar_setting(sidecar, "SIDECAR_CONFDIR", "")
    shared_volume, _, _ = resolve_mount(sidecar, pod_spec, trust)
    for app in app_containers:
        env = {name: literal_env(app, name) for name in env_map(app)}
        # Adds to Node's roots: the CA certificate alone, present from the Secret before start.
        assert env.get("NODE_EXTRA_CA_CERTS"), f"{app['name']}: set NODE_EXTRA_CA_CERTS"
        assert secret_key_at(app, pod_spec, env["NODE_EXTRA_CA_CERTS"]) == (CA_SECRET, "tls.crt")
        # These replace the roots: they must be the full bundle the sidecar writes.
        for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE"):
            assert env.get(name), f"{app['name']}: set {name}"
            volume, rel, mount = resolve_mount(app, pod_spec, env[name])
            assert volume["name"] == shared_volume["name"] and str(rel) == CA_BUNDLE_FILE, (
                f"{name} must be {CA_BUNDLE_FILE} in the sidecar's trust dir (public roots + CA), not {env[name]}"
            )
            assert mount.get("readOnly") is True


def test_podmonitor_selects_the_pods_and_port(deployment, sidecar):
    pm = find("PodMonitor")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for key, value in pm["spec"]["selector"].get("matchLabels", {}).items():
        assert labels.get(key) == value, f"PodMonitor selects {key}={value}, the pods do not carry it"
    ports = {p["name"] for p in sidecar.get("ports", [])}
    for ep in pm["spec"]["podMetricsEndpoints"]:
        assert ep["port"] in ports, f"PodMonitor port {ep['port']!r} is not a named port of the sidecar"
        assert ep.get("path", "/metrics") == "/metrics"
    # The Deployment's selector must match its own pod labels (else the API server rejects it).
    for key, value in deployment["spec"]["selector"]["matchLabels"].items():
        assert labels.get(key) == value


# ------------------------------------------------------------------ the documented CA recipe works


def _documented_command(prefix: str) -> list[str]:
    text = (K8S_DIR / "secret-example.yaml").read_text()
    lines = [line.lstrip("#").strip() for line in text.splitlines() if line.lstrip().startswith("#")]
    hits = [line for line in lines if line.startswith(prefix)]
    assert len(hits) == 1, f"secret-example.yaml must document exactly one `{prefix} ...` command"
    return shlex.split(hits[0])


def test_documented_secret_commands_are_consistent():
    create_tls = _documented_command("kubectl create secret tls")
    assert create_tls[4] == CA_SECRET
    # ...from the files the documented openssl command writes (checked in the next test).
    assert {"--cert=ca.crt", "--key=ca.key"} <= set(create_tls)
    create_qg = _documented_command("read -rs QG_URL && kubectl create secret generic")
    joined = " ".join(create_qg)
    assert f"generic {QUOTAGUARD_SECRET} " in joined and "--from-literal=QUOTAGUARDSTATIC_URL=" in joined


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> None:
    """A TLS handshake in memory (no sockets): raises ssl.SSLCertVerificationError on trust failure."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, obj in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("TLS handshake did not finish")


def test_documented_ca_recipe_makes_a_usable_ca(tmp_path):
    """Run the openssl command from secret-example.yaml. The sidecar must accept the CA
    (SIDECAR_CA_CERT/KEY) and load it into mitmproxy's certificate store, and a leaf it signs for
    a token host must pass Python's default verification (strict on 3.13+): the same check an
    app's requests/httpx does through the sidecar."""
    cmd = _documented_command("openssl req")
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to check the documented CA recipe"
    proc = subprocess.run([openssl, *cmd[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    crt, key = tmp_path / "ca.crt", tmp_path / "ca.key"
    assert crt.is_file() and key.is_file(), "the recipe must write ca.crt and ca.key (used by kubectl create)"

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from mitmproxy.certs import CertStore

    ca = x509.load_pem_x509_certificate(crt.read_bytes())
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign

    confdir = tmp_path / "confdir"
    confdir.mkdir()
    # The sidecar's own handling of SIDECAR_CA_CERT/KEY: validates, then writes mitmproxy's file.
    install_given_ca(crt, key, confdir)
    combined = confdir / MITM_CA
    store = CertStore.from_files(combined, confdir / "mitmproxy-dhparam.pem")
    host = "login.salesforce.com"
    entry = store.get_cert(host, [x509.DNSName(host)])
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(
        entry.cert.to_pem()
        + entry.privatekey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(leaf)
    trusting = ssl.create_default_context(cafile=str(crt))
    _handshake(server_ctx, trusting, host)
    # ...and the check has teeth: a client that does not trust the CA refuses the same leaf.
    untrusting = ssl.create_default_context(cadata=_unrelated_ca_pem(tmp_path, openssl))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, untrusting, host)


def _unrelated_ca_pem(tmp_path: Path, openssl: str) -> str:
    out = tmp_path / "other"
    out.mkdir()
    cmd = _documented_command("openssl req")
    subprocess.run([openssl, *cmd[1:]], cwd=out, capture_output=True, check=True, timeout=120)
    return (out / "ca.crt").read_text()


# ------------------------------------------------------------------------------ the NetworkPolicy


def _covers(rule_ports: list[dict] | None, port: int, protocol: str = "TCP") -> bool:
    if not rule_ports:  # no ports: every port
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        start = p.get("port")
        if start is None:
            return True
        if isinstance(start, str):
            raise AssertionError(f"use port numbers in the NetworkPolicy, not the name {start!r}")
        if start <= port <= p.get("endPort", start):
            return True
    return False


def _open_to_everyone(peers: list[dict] | None) -> bool:
    if not peers:
        return True
    for peer in peers:
        block = peer.get("ipBlock")
        if block and block.get("cidr") in ("0.0.0.0/0", "::/0"):
            return True
        if "namespaceSelector" in peer and not (peer["namespaceSelector"] or {}).get("matchLabels") and not (
            peer["namespaceSelector"] or {}
        ).get("matchExpressions"):
            return True  # every namespace
        if "podSelector" in peer and "namespaceSelector" not in peer and not peer["podSelector"]:
            return True  # every pod of the namespace
    return False


def admin_port_problems(policy: dict, pod_labels: dict, admin_port: int) -> list[str]:
    spec = policy["spec"]
    problems = []
    for key, value in spec["podSelector"].get("matchLabels", {}).items():
        if pod_labels.get(key) != value:
            problems.append(f"podSelector {key}={value} does not select the sidecar's pods")
    if not spec["podSelector"].get("matchLabels"):
        problems.append("podSelector must name the sidecar's pods")
    if "Ingress" not in spec.get("policyTypes", []):
        problems.append("policyTypes must include Ingress")
    rules = [r for r in spec.get("ingress", []) if _covers(r.get("ports"), admin_port)]
    if not rules:
        problems.append(f"no rule admits Prometheus to the admin port {admin_port}")
    for rule in rules:
        if _open_to_everyone(rule.get("from")):
            problems.append(f"a rule opens the admin port {admin_port} to everyone: {rule}")
        for peer in rule.get("from", []):
            if not (peer.get("podSelector") or {}).get("matchLabels"):
                problems.append(f"admin port peer without a pod selector: {peer}")
    return problems


def test_networkpolicy_closes_the_admin_port_to_all_but_prometheus(deployment, sidecar):
    policy = find("NetworkPolicy")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    admin_port = port_of(sidecar_setting(sidecar, "SIDECAR_ADMIN_LISTEN", DEFAULT_ADMIN_LISTEN))
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports["admin"] == admin_port
    assert admin_port_problems(policy, labels, admin_port) == []
    # It selects the pods the PodMonitor scrapes, and the peer it admits looks like Prometheus.
    pm = find("PodMonitor")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pm["spec"]["selector"]["matchLabels"].items()
    (rule,) = [r for r in policy["spec"]["ingress"] if _covers(r.get("ports"), admin_port)]
    assert any("prometheus" in str(peer).lower() for peer in rule["from"])


def test_networkpolicy_leaves_the_apps_other_ports_as_they_were(sidecar):
    """Selecting the pod isolates it; the policy must not close the app's own ports meanwhile."""
    policy = find("NetworkPolicy")
    admin_port = port_of(sidecar_setting(sidecar, "SIDECAR_ADMIN_LISTEN", DEFAULT_ADMIN_LISTEN))
    open_rules = [r for r in policy["spec"]["ingress"] if _open_to_everyone(r.get("from"))]
    for port in (1, 80, 443, 8080, admin_port - 1, admin_port + 1, 65535):
        assert any(_covers(r.get("ports"), port) for r in open_rules), f"TCP port {port} would be closed"
        assert any(_covers(r.get("ports"), port, "UDP") for r in open_rules), f"UDP port {port} would be closed"
    assert not any(_covers(r.get("ports"), admin_port) for r in open_rules)


def test_networkpolicy_check_has_teeth(deployment):
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    policy = find("NetworkPolicy")
    open_admin = yaml.safe_load(yaml.safe_dump(policy))
    open_admin["spec"]["ingress"][0].pop("from")
    assert any("everyone" in p for p in admin_port_problems(open_admin, labels, 9464))
    wide = yaml.safe_load(yaml.safe_dump(policy))
    wide["spec"]["ingress"][-1]["ports"][0]["endPort"] = 9464
    assert any("everyone" in p for p in admin_port_problems(wide, labels, 9464))
    other_pods = yaml.safe_load(yaml.safe_dump(policy))
    other_pods["spec"]["podSelector"] = {"matchLabels": {"app": "something-else"}}
    assert any("does not select" in p for p in admin_port_problems(other_pods, labels, 9464))


def test_app_container_gets_the_same_java_and_node_settings_the_sidecar_gives_exec(app_containers: list[dict]) -> None:
    """JAVA_TOOL_OPTIONS in the example is what `egress-sidecar exec` would set for this proxy, trust
    directory and NO_PROXY (sidecar.ops.trust.java_tool_options), so a Java app works unchanged."""
    from sidecar.ops.trust import java_tool_options

    (app,) = app_containers
    trust = next(m["mountPath"] for m in app["volumeMounts"] if m["name"] == "egress-sidecar-trust")
    expected = java_tool_options(literal_env(app, "HTTPS_PROXY") or "", Path(trust) / "truststore.p12",
                                 literal_env(app, "NO_PROXY") or "")
    assert literal_env(app, "JAVA_TOOL_OPTIONS") == expected
    assert literal_env(app, "NODE_USE_ENV_PROXY") == "1"


# ------------------------------------------------------------------------------------- the PodMonitor


def _sanitize(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _snake(key: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), key)


def podmonitor_scrape_config(podmonitor: dict, namespace: str) -> dict:
    """The scrape job the Prometheus Operator generates for the PodMonitor, for what decides a target's
    labels: the selector and port filter, then `job` = "<namespace>/<podmonitor name>", then `jobLabel`'s
    pod label when it has a value, then the endpoint's own relabelings (prometheus-operator
    pkg/prometheus/promcfg.go, generatePodMonitorConfig). Kubernetes discovery is replaced by file_sd
    targets carrying the same __meta_kubernetes_* labels."""
    spec = podmonitor["spec"]
    (endpoint,) = spec["podMetricsEndpoints"]
    relabel: list[dict] = []
    for name, value in spec["selector"].get("matchLabels", {}).items():
        relabel.append({"action": "keep", "source_labels": [f"__meta_kubernetes_pod_label_{_sanitize(name)}"],
                        "regex": re.escape(value)})
    relabel.append({"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                    "regex": endpoint["port"]})
    relabel.append({"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"})
    relabel.append({"target_label": "job", "replacement": f"{namespace}/{podmonitor['metadata']['name']}"})
    if spec.get("jobLabel"):
        relabel.append({"source_labels": [f"__meta_kubernetes_pod_label_{_sanitize(spec['jobLabel'])}"],
                        "target_label": "job", "regex": "(.+)", "replacement": "${1}"})
    for rule in endpoint.get("relabelings", []):
        relabel.append({_snake(k): v for k, v in rule.items()})
    return {"job_name": f"podMonitor/{namespace}/{podmonitor['metadata']['name']}/0",
            "metrics_path": endpoint.get("path", "/metrics"), "relabel_configs": relabel}


def test_podmonitor_gives_each_app_its_own_job(tmp_path):
    """The rules sum and compare `by (job)`, assuming one job per app (one Salesforce app and allowlist).
    A real Prometheus applies the PodMonitor's relabelling to pods of two apps in two namespaces: each
    app in each namespace gets a job of its own, its replicas share it, and unselected pods are left out."""
    import json
    import urllib.request

    from tests.e2e.test_prometheus import require_prometheus
    from tests.harness import free_port, wait_http_ok, wait_until

    binary = require_prometheus()
    podmonitor = find("PodMonitor")
    namespace = "shop"

    def pod(ns: str, app: str | None, n: int, enabled: str = "true") -> dict:
        labels = {"__meta_kubernetes_namespace": ns, "__meta_kubernetes_pod_name": f"{app}-{n}",
                  "__meta_kubernetes_pod_container_port_name": "admin",
                  "__meta_kubernetes_pod_label_egress_sidecar_enabled": enabled}
        if app is not None:
            labels["__meta_kubernetes_pod_label_app_kubernetes_io_name"] = app
        return {"targets": [f"127.0.0.1:{free_port()}"], "labels": labels}

    template = find("Deployment")["spec"]["template"]["metadata"]["labels"]
    app = template["app.kubernetes.io/name"]
    pods = [pod(namespace, app, 0), pod(namespace, app, 1), pod(namespace, "billing", 0),
            pod("staging", app, 0), pod(namespace, "other", 0, enabled="false")]
    (tmp_path / "pods.json").write_text(json.dumps(pods))
    jobs = [{**podmonitor_scrape_config(podmonitor, namespace), "scrape_interval": "1h",
             "file_sd_configs": [{"files": [str(tmp_path / "pods.json")]}]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({"scrape_configs": jobs}))
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        problem = wait_http_ok(f"http://127.0.0.1:{port}/-/ready", proc, 30)
        assert problem is None, problem

        def targets() -> list[dict]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5) as resp:
                return json.loads(resp.read())["data"]["activeTargets"]

        assert wait_until(lambda: len(targets()) == 4, timeout=20), targets()
        jobs_seen = sorted(t["labels"]["job"] for t in targets())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert jobs_seen == sorted([f"{namespace}/{app}", f"{namespace}/{app}", f"{namespace}/billing",
                                f"staging/{app}"]), jobs_seen


def test_podmonitor_job_comes_from_a_label_every_app_pod_carries():
    """The label the PodMonitor names the job after is on the Deployment's pod template (without it every
    app of the namespace would fall back to one job, the PodMonitor's name)."""
    spec = find("PodMonitor")["spec"]
    (endpoint,) = spec["podMetricsEndpoints"]
    sources = [s for r in endpoint.get("relabelings", []) if r.get("targetLabel") == "job"
               for s in r.get("sourceLabels", [])]
    if spec.get("jobLabel"):
        sources.append("__meta_kubernetes_pod_label_" + _sanitize(spec["jobLabel"]))
    pod_labels = [s for s in sources if s.startswith("__meta_kubernetes_pod_label_")]
    assert pod_labels, "the PodMonitor sets no job from a pod label (jobLabel or a relabeling)"
    template = find("Deployment")["spec"]["template"]["metadata"]["labels"]
    for source in pod_labels:
        assert any("__meta_kubernetes_pod_label_" + _sanitize(k) == source for k in template), (
            f"{source} is not a label of the Deployment's pod template"
        )
