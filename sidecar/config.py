"""All configuration of the sidecar: one pydantic-settings model, read from the environment.

Every setting is an environment variable (``SIDECAR_*``, plus QuotaGuard's own
``QUOTAGUARDSTATIC_URL``). A bad value fails at start with one message that names the variable and
says how to fix it (:class:`ConfigError`); the proxy password never appears in any message.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sidecar.allowlist import Allowlist, AllowlistError, parse_allowlist

DEFAULT_TOKEN_HOSTS = (
    "login.salesforce.com",
    "test.salesforce.com",
    "*.my.salesforce.com",
    "*.sandbox.my.salesforce.com",
    "*.my.site.com",
)
DEFAULT_CONFDIR = Path("~/.egress-sidecar")
DEFAULT_ECHO_URL = "http://ip.quotaguard.com/"


class ConfigError(Exception):
    """A configuration value is wrong. The message names the setting and the fix."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True)
class Upstream:
    """The QuotaGuard Static proxy: where it is and how to authenticate (never printed whole)."""

    host: str
    port: int
    username: str
    password: SecretStr

    @property
    def proxy_authorization(self) -> bytes:
        raw = f"{self.username}:{self.password.get_secret_value()}".encode()
        return b"Basic " + base64.b64encode(raw)

    def redacted(self) -> str:
        return f"http://{self.username}:***@{HostPort(self.host, self.port)}"


def parse_host_port(value: str, *, default_port: int | None = None) -> HostPort:
    """``HOST:PORT``, ``[V6]:PORT`` or (with a default port) a bare host."""
    value = value.strip()
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([^:\[\]\s]+)(?::(\d+))?", value)
    if not m:
        raise ValueError(f"{value!r} is not HOST:PORT")
    host = m.group(1) or m.group(3)
    port_s = m.group(2) or m.group(4)
    if port_s is None:
        if default_port is None:
            raise ValueError(f"{value!r} has no port; write it as HOST:PORT")
        return HostPort(host, default_port)
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} in {value!r} is out of range 0-65535")
    return HostPort(host, port)


def parse_upstream_url(value: str) -> Upstream:
    """Parse ``http://USER:PASS@HOST:PORT``. Error messages never contain the password."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        raise ValueError("is not a URL of the form http://USER:PASS@HOST:PORT") from None
    if parts.scheme != "http":
        shown = parts.scheme or "(none)"
        raise ValueError(
            f"scheme {shown!r} is not supported; QuotaGuard Static is an HTTP proxy: "
            "use http://USER:PASS@HOST:9293"
        )
    if not parts.hostname:
        raise ValueError("has no host; use http://USER:PASS@HOST:9293")
    if parts.username is None or parts.password is None:
        raise ValueError(
            "has no USER:PASS; copy the whole URL from the QuotaGuard dashboard "
            "(http://USER:PASS@HOST:9293)"
        )
    return Upstream(
        host=parts.hostname,
        port=port or 9293,
        username=unquote(parts.username),
        password=SecretStr(unquote(parts.password)),
    )


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in re.split(r"[,\s]+", value) if item.strip()]
    return value


class Settings(BaseSettings):
    """The sidecar's settings. Field ``foo`` is read from ``SIDECAR_FOO`` unless an alias says otherwise."""

    model_config = SettingsConfigDict(env_prefix="SIDECAR_", extra="ignore", frozen=True)

    quotaguardstatic_url: SecretStr | None = Field(
        default=None,
        validation_alias="QUOTAGUARDSTATIC_URL",
        description="QuotaGuard Static proxy URL http://USER:PASS@HOST:PORT; unset = direct mode.",
    )
    listen: str = Field("127.0.0.1:3128", description="Proxy listen address HOST:PORT.")
    admin_listen: str = Field(
        "0.0.0.0:9464", description="Admin server (metrics, health, status) HOST:PORT."
    )
    pair: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Explicit pair members HOST:PORT,HOST:PORT (default: the upstream's A/AAAA records).",
    )
    token_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_TOKEN_HOSTS),
        description="Host patterns whose TLS is intercepted (* matches one DNS label).",
    )
    route: Literal["token", "salesforce", "all"] = Field(
        "token", description="What goes through the pair: token calls, all Salesforce traffic, or all."
    )
    confdir: Path = Field(DEFAULT_CONFDIR, description="Directory for the CA and state.")
    upstream_ca: Path | None = Field(
        None, description="Extra CA bundle (PEM) trusted when verifying intercepted servers."
    )
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    echo_url: str = Field(DEFAULT_ECHO_URL, description="IP echo URL probed through each member.")
    probe_interval: float = Field(60.0, ge=1.0, le=86400.0, description="Seconds between egress probes.")
    probe_samples: int = Field(3, ge=1, le=20, description="Echo samples per member per probe.")
    egress_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Pinned member egress IPs MEMBER=IP,..."
    )
    allowlist: str | None = Field(
        None, description="The Refresh Token IP Allowlist: IPs, CIDRs, START-END ranges."
    )
    guard: Literal["observe", "enforce"] | None = Field(
        None, description="observe or enforce (default: enforce when an allowlist is set)."
    )
    ca_cert: Path | None = Field(None, description="Use this CA certificate (PEM) instead of generating one.")
    ca_key: Path | None = Field(None, description="The private key (PEM) of SIDECAR_CA_CERT.")
    connect_timeout: float = Field(5.0, gt=0, le=120, description="Connect deadline in seconds.")
    response_timeout: float = Field(
        30.0, gt=0, le=600, description="Deadline in seconds for Salesforce's answer to a sent token call."
    )
    max_connections: int = Field(
        1000, ge=1, le=100_000, description="Concurrent client connections served; beyond it new requests get 503."
    )
    idle_timeout: int = Field(300, ge=1, le=86400, description="Seconds before an idle client connection closes.")
    proxy_auth: SecretStr | None = Field(
        None, description="Require Basic proxy auth user:pass from clients."
    )

    @classmethod
    def settings_customise_sources(  # type: ignore[override]
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # load_settings() picks the variables out of the environment it is given; reading
        # os.environ here as well would let a test's or a parent's environment leak in.
        return (init_settings,)

    @field_validator("pair", "token_hosts", "egress_ips", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", "route", "guard", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            return value or None
        return value

    @field_validator("quotaguardstatic_url", "proxy_auth", "allowlist", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("quotaguardstatic_url")
    @classmethod
    def _check_upstream(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_upstream_url(value.get_secret_value())
        return value

    @field_validator("listen", "admin_listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @field_validator("pair")
    @classmethod
    def _check_pair(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_host_port(item)
        return value

    @field_validator("token_hosts")
    @classmethod
    def _check_token_hosts(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("is empty; list at least one host pattern")
        for item in value:
            if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", item):
                raise ValueError(
                    f"{item!r} is not a host name or pattern like *.my.salesforce.com ('*.' may only lead)"
                )
        return value

    @field_validator("egress_ips")
    @classmethod
    def _check_egress_ips(cls, value: list[str]) -> list[str]:
        for item in value:
            member, sep, ip = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r} is not MEMBER=IP (e.g. 10.0.0.5:9293=52.1.2.3)")
            parse_host_port(member)
            ipaddress.ip_address(ip.strip())
        return value

    @field_validator("allowlist")
    @classmethod
    def _check_allowlist(cls, value: str | None) -> str | None:
        parse_allowlist(value)
        return value

    @field_validator("proxy_auth")
    @classmethod
    def _check_proxy_auth(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and ":" not in value.get_secret_value():
            raise ValueError("is not user:password")
        return value

    @field_validator("echo_url")
    @classmethod
    def _check_echo_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    # Derived values: computed from the fields, never stored twice.
    @property
    def upstream(self) -> Upstream | None:
        if self.quotaguardstatic_url is None:
            return None
        return parse_upstream_url(self.quotaguardstatic_url.get_secret_value())

    @property
    def listen_address(self) -> HostPort:
        return parse_host_port(self.listen)

    @property
    def admin_address(self) -> HostPort:
        return parse_host_port(self.admin_listen)

    @property
    def pair_members(self) -> list[HostPort]:
        return [parse_host_port(p) for p in self.pair]

    @property
    def pinned_egress(self) -> dict[HostPort, str]:
        out: dict[HostPort, str] = {}
        for item in self.egress_ips:
            member, _, ip = item.partition("=")
            out[parse_host_port(member)] = str(ipaddress.ip_address(ip.strip()))
        return out

    @property
    def allowlist_ranges(self) -> Allowlist:
        return parse_allowlist(self.allowlist)

    @property
    def guard_mode(self) -> Literal["observe", "enforce"]:
        if self.guard is not None:
            return self.guard
        # Direct mode has no member to choose, so there is nothing to enforce with.
        return "enforce" if self.allowlist_ranges and self.upstream is not None else "observe"

    @property
    def confdir_path(self) -> Path:
        return self.confdir.expanduser()

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]


# Settings whose value must never be echoed back in an error message.
_SECRET_FIELDS = {"quotaguardstatic_url", "proxy_auth"}


def env_name(field: str) -> str:
    info = Settings.model_fields[field]
    alias = info.validation_alias
    return alias if isinstance(alias, str) else f"SIDECAR_{field.upper()}"


def _describe(err: dict[str, Any]) -> str:
    field = str(err["loc"][0]) if err.get("loc") else "?"
    name = env_name(field) if field in Settings.model_fields else field
    msg = str(err.get("msg", "invalid"))
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    hint = _HINTS.get(field, "")
    if field in _SECRET_FIELDS or field not in Settings.model_fields:
        shown = ""
    else:
        value = err.get("input")
        shown = f" (got {value!r})" if isinstance(value, (str, int, float)) else ""
    return f"{name}{shown}: {msg}.{(' ' + hint) if hint else ''}"


_HINTS = {
    "quotaguardstatic_url": "Copy it from the QuotaGuard dashboard, or unset it for direct mode.",
    "listen": "Example: SIDECAR_LISTEN=127.0.0.1:3128.",
    "admin_listen": "Example: SIDECAR_ADMIN_LISTEN=0.0.0.0:9464.",
    "pair": "Example: SIDECAR_PAIR=10.0.0.5:9293,10.0.0.6:9293.",
    "token_hosts": "Example: SIDECAR_TOKEN_HOSTS=login.salesforce.com,*.my.salesforce.com.",
    "route": "Use one of: token, salesforce, all.",
    "log_format": "Use json or text.",
    "log_level": "Use DEBUG, INFO, WARNING or ERROR.",
    "guard": "Use observe or enforce.",
    "egress_ips": "Example: SIDECAR_EGRESS_IPS=10.0.0.5:9293=52.1.2.3,10.0.0.6:9293=52.1.2.4.",
    "allowlist": "Copy the entries of the External Client App's Refresh Token IP Allowlist.",
    "proxy_auth": "Example: SIDECAR_PROXY_AUTH=app:long-random-password.",
}


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Read settings from ``env`` (default: the process environment) or raise :class:`ConfigError`."""
    source = os.environ if env is None else env
    known = {env_name(f) for f in Settings.model_fields}
    relevant = {k: v for k, v in source.items() if k in known}
    try:
        settings = Settings(**{_field_for(k): v for k, v in relevant.items()})
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(e) for e in exc.errors())) from None
    except AllowlistError as exc:  # raised from a validator outside pydantic's wrapping
        raise ConfigError(f"SIDECAR_ALLOWLIST: {exc}") from None
    _check_files(settings)
    return settings


def unknown_settings(env: dict[str, str] | None = None) -> list[str]:
    """``SIDECAR_*`` variables that are not settings (typos; warned about, not fatal, since
    Kubernetes injects ``SIDECAR_SERVICE_HOST``-style variables for a Service named ``sidecar``)."""
    source = os.environ if env is None else env
    known = {env_name(f) for f in Settings.model_fields}
    return sorted(k for k in source if k.startswith("SIDECAR_") and k not in known)


def _field_for(env_key: str) -> str:
    for field in Settings.model_fields:
        if env_name(field) == env_key:
            return field if env_key != "QUOTAGUARDSTATIC_URL" else "QUOTAGUARDSTATIC_URL"
    raise KeyError(env_key)


def _check_files(settings: Settings) -> None:
    for field in ("upstream_ca", "ca_cert", "ca_key"):
        path = getattr(settings, field)
        if path is not None and not Path(path).expanduser().is_file():
            raise ConfigError(f"{env_name(field)}: {str(path)!r} is not a readable file. Point it at a PEM file.")
    if (settings.ca_cert is None) != (settings.ca_key is None):
        raise ConfigError(
            "SIDECAR_CA_CERT and SIDECAR_CA_KEY go together: set both (the CA certificate and its key) or neither."
        )
    if settings.guard == "enforce" and settings.upstream is None:
        raise ConfigError(
            "SIDECAR_GUARD=enforce needs QUOTAGUARDSTATIC_URL: without the pair there is no allowlisted egress to "
            "choose, so nothing can be enforced. Set the upstream, or use SIDECAR_GUARD=observe."
        )
    if settings.guard == "enforce" and not settings.allowlist_ranges:
        raise ConfigError(
            "SIDECAR_GUARD=enforce needs SIDECAR_ALLOWLIST: set the allowlist (the IPs you entered in "
            "Salesforce) or use SIDECAR_GUARD=observe."
        )
