"""Offline checks of deploy/kubernetes/: schemas, wiring between the objects, and the sidecar contract.

No cluster is needed. Built-in kinds are validated against the Kubernetes OpenAPI schemas shipped
by ``kubernetes-validate`` (strict: unknown fields are errors) for the oldest Kubernetes with native
sidecars (1.29) and the newest version the package ships. Prometheus Operator CRDs (PodMonitor,
PrometheusRule), which it does not know, are checked by hand. Then the wiring that no schema can
see: env names are real sidecar settings, probes hit the admin port, the app's proxy and CA
variables point at what the sidecar really serves, the CA key never reaches the app.

``SIDECAR_ENV_CONTRACT`` and :func:`sidecar_env_names` are also used by tests/test_dockerfile.py.
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

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest Kubernetes with native sidecars on by default (SidecarContainers beta, 1.29).
MIN_K8S_VERSION = "1.29.0"

SIDECAR_CONTAINER = "egress-sidecar"
CA_SECRET = "egress-sidecar-ca"
QUOTAGUARD_SECRET = "quotaguard"
CONFIGMAP = "egress-sidecar"
# Files the sidecar writes into SIDECAR_CONFDIR (the contract; see the task brief / README).
CA_BUNDLE_FILE = "ca-bundle.pem"

# The sidecar's settings as agreed in the design. Used only while sidecar/config.py does not exist;
# once it exists, the names come from its Settings model and this list must be a subset of them.
SIDECAR_ENV_CONTRACT = frozenset(
    {
        "QUOTAGUARDSTATIC_URL",
        "SIDECAR_LISTEN",
        "SIDECAR_ADMIN_LISTEN",
        "SIDECAR_PAIR",
        "SIDECAR_TOKEN_HOSTS",
        "SIDECAR_ROUTE",
        "SIDECAR_CONFDIR",
        "SIDECAR_UPSTREAM_CA",
        "SIDECAR_LOG_FORMAT",
        "SIDECAR_LOG_LEVEL",
        "SIDECAR_ECHO_URL",
        "SIDECAR_PROBE_INTERVAL",
        "SIDECAR_EGRESS_IPS",
        "SIDECAR_ALLOWLIST",
        "SIDECAR_GUARD",
        "SIDECAR_CA_CERT",
        "SIDECAR_CA_KEY",
        "SIDECAR_CONNECT_TIMEOUT",
        "SIDECAR_PROXY_AUTH",
    }
)
DEFAULT_LISTEN = "127.0.0.1:3128"
DEFAULT_ADMIN_LISTEN = "0.0.0.0:9464"


# --------------------------------------------------------------------------- the sidecar's settings


def settings_class() -> Any | None:
    """``sidecar.config.Settings`` if sidecar/config.py exists (then it MUST import), else None."""
    if not (ROOT / "sidecar" / "config.py").is_file():
        return None
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from sidecar.config import Settings  # an error here is a real failure, not a fallback

    return Settings


def sidecar_env_names() -> frozenset[str]:
    """Every environment variable the sidecar reads, from its pydantic-settings model."""
    settings = settings_class()
    if settings is None:
        return SIDECAR_ENV_CONTRACT
    from pydantic import AliasChoices, AliasPath

    prefix = settings.model_config.get("env_prefix", "") or ""
    names: set[str] = set()
    for field, info in settings.model_fields.items():
        alias = info.validation_alias if info.validation_alias is not None else info.alias
        if alias is None:
            names.add(f"{prefix}{field}".upper())
            continue
        # pydantic-settings does not apply env_prefix to aliases.
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        for choice in choices:
            if isinstance(choice, AliasPath):
                choice = choice.path[0]
            names.add(str(choice).upper())
    return frozenset(names)


def test_settings_model_has_every_contract_name():
    """The agreed names (used in manifests and docs) are what the sidecar really reads."""
    if settings_class() is None:
        pytest.skip("sidecar/config.py does not exist yet; manifests are checked against the contract list")
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


def port_of(host_port: str) -> int:
    return int(host_port.rsplit(":", 1)[1])


def host_of(host_port: str) -> str:
    return host_port.rsplit(":", 1)[0].strip("[]")


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


@pytest.mark.parametrize(
    ("probe", "path"), [("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]
)
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


def test_confdir_is_a_writable_shared_emptydir(pod_spec, sidecar, app_containers):
    confdir = sidecar_setting(sidecar, "SIDECAR_CONFDIR", "")
    assert confdir.startswith("/"), "SIDECAR_CONFDIR must be set (image ENV or pod env) to an absolute path"
    volume, rel, mount = resolve_mount(sidecar, pod_spec, confdir)
    assert str(rel) == "." and not mount.get("readOnly"), "the confdir must be the root of a writable mount"
    assert "emptyDir" in volume, "the confdir must be an emptyDir (the root filesystem is read-only)"
    assert volume["name"] == "egress-sidecar-ca-bundle"
    for app in app_containers:
        shared = [m for m in app.get("volumeMounts", []) if m["name"] == volume["name"]]
        assert shared and all(m.get("readOnly") is True for m in shared), (
            f"{app['name']} must mount {volume['name']!r} read-only"
        )


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
    if settings_class() is None:
        pytest.skip("sidecar/config.py does not exist yet")
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
    confdir = sidecar_setting(sidecar, "SIDECAR_CONFDIR", "")
    shared_volume, _, _ = resolve_mount(sidecar, pod_spec, confdir)
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
                f"{name} must be {CA_BUNDLE_FILE} in the sidecar's confdir (public roots + CA), not {env[name]}"
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
    if (ROOT / "sidecar" / "ca.py").is_file():
        # The sidecar's own handling of SIDECAR_CA_CERT/KEY: validates, then writes mitmproxy's file.
        settings_class()  # puts the repository on sys.path
        from sidecar.ca import MITM_CA, install_given_ca

        install_given_ca(crt, key, confdir)
        combined = confdir / MITM_CA
    else:
        combined = confdir / "mitmproxy-ca.pem"
        combined.write_bytes(key.read_bytes() + crt.read_bytes())
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
