"""The settings the manifests, the Dockerfile and the docs rely on: the names agreed in the design, which
must stay a subset of what ``sidecar.config.Settings`` reads, and the default listen addresses."""

from __future__ import annotations

from pydantic import AliasChoices, AliasPath

from sidecar.config import Settings

SIDECAR_ENV_CONTRACT = frozenset(
    {
        "QUOTAGUARDSTATIC_URL",
        "SIDECAR_LISTEN",
        "SIDECAR_ADMIN_LISTEN",
        "SIDECAR_PAIR",
        "SIDECAR_TOKEN_HOSTS",
        "SIDECAR_ROUTE",
        "SIDECAR_SALESFORCE_TUNNELS",
        "SIDECAR_CONFDIR",
        "SIDECAR_TRUST_DIR",
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


def sidecar_env_names() -> frozenset[str]:
    """Every environment variable the sidecar reads, from its pydantic-settings model."""
    prefix = Settings.model_config.get("env_prefix", "") or ""
    names: set[str] = set()
    for field, info in Settings.model_fields.items():
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


def port_of(host_port: str) -> int:
    return int(host_port.rsplit(":", 1)[1])


def host_of(host_port: str) -> str:
    return host_port.rsplit(":", 1)[0].strip("[]")
