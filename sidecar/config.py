"""All configuration of the sidecar: one pydantic-settings model, read from the environment.

Every setting is an environment variable (``SIDECAR_*``, plus QuotaGuard's own
``QUOTAGUARDSTATIC_URL``). A bad value fails at start with one message that names the variable and
says how to fix it (:class:`ConfigError`); the proxy password never appears in any message.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import logging
import os
import re
import textwrap
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    SettingsConfigDict,
    SettingsError,
)
from pydantic_settings.sources.utils import parse_env_vars

from sidecar.egress.allowlist import Allowlist, AllowlistError, parse_allowlist
from sidecar.state.expiry import IdlePolicy, parse_duration, parse_idle_policy

# The hosts Salesforce serves /services/oauth2/token on (sources and what each says: sidecar/token/hosts.py).
# My Domain login hosts: production, then the partitioned forms Salesforce gives sandboxes, Developer
# Edition orgs, scratch orgs, patch orgs, demo orgs and Trailhead playgrounds (the DomainPartition values
# of the Tooling API's OrgDomainLog: NAME.develop.my.salesforce.com, ...); ISVs build on the last few.
# Experience Cloud sites (my.site.com) take the same partitions; legacy site domains are NAME.force.com.
# Government Cloud Plus My Domains (NAME.my.salesforce.mil) by analogy: they appear in public code only.
DEFAULT_TOKEN_HOSTS = (
    "login.salesforce.com",
    "test.salesforce.com",
    "*.my.salesforce.com",
    "*.sandbox.my.salesforce.com",
    "*.develop.my.salesforce.com",
    "*.scratch.my.salesforce.com",
    "*.patch.my.salesforce.com",
    "*.demo.my.salesforce.com",
    "*.trailblaze.my.salesforce.com",
    "*.my.site.com",
    "*.sandbox.my.site.com",
    "*.develop.my.site.com",
    "*.scratch.my.site.com",
    "*.patch.my.site.com",
    "*.demo.my.site.com",
    "*.trailblaze.my.site.com",
    "*.force.com",
    "*.my.salesforce.mil",
)
DEFAULT_CONFDIR = Path("~/.egress-sidecar")
DEFAULT_ECHO_URL = "http://ip.quotaguard.com/"


class ConfigError(Exception):
    """A configuration value is wrong. The message names the setting and the fix."""


class StorageError(ConfigError):
    """The sidecar cannot write its state at start: a full disk (or a failing volume) under SIDECAR_CONFDIR
    or SIDECAR_TRUST_DIR. The message names the path and the fix; ``egress-sidecar`` exits with 3."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # EFBIG: a file size limit (RLIMIT_FSIZE)


def storage_error(path: Path | str, exc: BaseException, setting: str = "SIDECAR_CONFDIR") -> ConfigError:
    """The one-line error for a write at start that failed: StorageError for a full disk (the errno says so,
    SQLite says "full", or the volume has next to no space left after the failure) or SQLite failing on the
    volume otherwise; ConfigError for any other path that cannot be written (read-only, no permission, not
    a directory), which is the setting's to fix."""
    where = str(path)
    detail = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__
    if (isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS) or "full" in detail or _nearly_full(Path(path)):
        return StorageError(f"cannot write {where!r}: the disk is full ({detail}). Free space on that volume (or "
                            f"give {setting} a larger one) and restart.")
    if isinstance(exc, OSError):
        return ConfigError(f"{setting}: cannot write {where!r} ({detail}). Point it at a writable directory.")
    return StorageError(f"cannot write {where!r} ({detail}). Check that the volume is writable and healthy, and "
                        "restart.")


def _nearly_full(path: Path, below: int = 1024 * 1024) -> bool:
    """Whether the volume holding ``path`` (or its nearest existing parent) has less than ``below`` bytes
    free: SQLite reports some writes that fail for lack of space as "disk I/O error"."""
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize < below
    return False


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


def decode_key(text: str) -> bytes:
    """A 32-byte key given as 64 hex digits or base64 (SIDECAR_REDIS_KEY). Raises ValueError."""
    text = text.strip()
    try:
        key = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError("is not 32 bytes as 64 hex digits or base64 (make one with: openssl rand -hex 32)")
    return key


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in re.split(r"[,\s]+", value) if item.strip()]
    return value


def _setting(default: Any = ..., *, doc: str, shown_default: str | None = None, **kwargs: Any) -> Any:
    """A setting's Field: ``doc`` is its one help text (the table in docs/configuration.md and ``--help``
    are made from it); ``shown_default`` describes a default that is not a plain value (Markdown)."""
    extra = {"shown_default": shown_default} if shown_default is not None else None
    return Field(default, description=doc, json_schema_extra=extra, **kwargs)


class Settings(BaseSettings):
    """The sidecar's settings, read by pydantic-settings from the environment.

    Field ``foo`` is ``SIDECAR_FOO`` (``env_prefix``) unless a validation alias names the variable
    (``QUOTAGUARDSTATIC_URL``, QuotaGuard's own). Names are matched case-insensitively. Each Field's
    description is the setting's only help text: the configuration table in docs/configuration.md and
    the ``--help`` epilog are generated from it (tests/test_docs.py checks the table).
    """

    model_config = SettingsConfigDict(env_prefix="SIDECAR_", extra="ignore", frozen=True)

    quotaguardstatic_url: SecretStr | None = _setting(
        None,
        validation_alias="QUOTAGUARDSTATIC_URL",
        shown_default="unset (direct mode)",
        doc="The QuotaGuard Static proxy, `http://USER:PASS@HOST:PORT`.",
    )
    listen: str = _setting("127.0.0.1:3128", doc="The proxy's address.")
    admin_listen: str = _setting(
        "0.0.0.0:9464", doc="Admin server: `/`, `/metrics`, `/healthz`, `/serving`, `/readyz`, `/status`, `/ca.pem`."
    )
    pair: Annotated[list[str], NoDecode] = _setting(
        default_factory=list,
        shown_default="the upstream's A/AAAA records",
        doc="Explicit members `HOST:PORT,HOST:PORT` (a host name is looked up once, at start: members are "
        "connected to by IP address).",
    )
    token_hosts: Annotated[list[str], NoDecode] = _setting(
        default_factory=lambda: list(DEFAULT_TOKEN_HOSTS),
        doc="Hosts whose TLS is intercepted. `*.` stands for exactly one DNS label. The defaults cover login, test "
        "and every My Domain login host (production, sandbox, Developer Edition, scratch, patch, demo, Trailhead "
        "playground), Experience Cloud sites (the same forms under my.site.com, and legacy NAME.force.com sites) "
        "and Government Cloud Plus My Domains (NAME.my.salesforce.mil). Add custom domains and instance hosts "
        "(NAME.salesforce.com) here.",
    )
    salesforce_tunnels: Literal["pair", "direct"] = _setting(
        "pair",
        doc="Where a tunnel to a Salesforce-owned domain that is not a token host goes (Lightning, Visualforce, "
        "sites, instance hosts, ...: relayed as raw bytes, never decrypted): `pair` (through a pair member, so it "
        "leaves from a static IP) or `direct` (as `SIDECAR_ROUTE` says). Counted per domain class in "
        "`egress_sidecar_salesforce_tunnels_total`.",
    )
    route: Literal["token", "salesforce", "all"] = _setting(
        "token",
        doc="What goes through the pair: `token` (token calls only), `salesforce` (all traffic to intercepted "
        "hosts), `all` (every request and tunnel).",
    )
    allowlist: str | None = _setting(
        None,
        doc="The Refresh Token IP Allowlist as entered in Salesforce: IPs, CIDRs and `START-END` ranges, IPv4 and "
        "IPv6, comma- or newline-separated. Salesforce's limits are enforced: at most 128 ranges and 256 single "
        "addresses.",
    )
    guard: Literal["observe", "enforce"] | None = _setting(
        None,
        shown_default="`enforce` with the upstream, else `observe`",
        doc="`enforce`: never send a refresh from an egress IP Salesforce refused for that app (and, where "
        "Salesforce has not answered yet, not from one `SIDECAR_ALLOWLIST` leaves out); works on Salesforce's "
        "answers alone when no allowlist is set; needs the upstream. `observe`: route as QuotaGuard would and "
        "report every token call that leaves from an IP that is not allowlisted.",
    )
    evidence_ttl: float = _setting(
        900.0,
        ge=1.0,
        le=7 * 86400.0,
        doc="Seconds after an \"ip restricted\" answer through an egress IP before it is re-tested: then one real "
        "redemption may go through it (a refused one is sent again through another IP), so an allowlist fixed in "
        "Salesforce is picked up without a restart. The refusal holds until a redemption through that IP "
        "succeeds; a refused re-test schedules the next one.",
    )
    app_refusal_orgs: int = _setting(
        2,
        ge=1,
        le=1000,
        doc="How many customer orgs must be refused (\"ip restricted\") through an egress IP, with no org redeeming "
        "through it since, before it counts as refused for the whole app (missing from the External Client App's "
        "Refresh Token IP Allowlist). Fewer is each org's own restriction: only that org's redemptions avoid the "
        "IP. `1` treats every refusal as the app's.",
    )
    retry_ip_restricted: bool | None = _setting(
        None,
        shown_default="`true` in enforce, `false` in observe",
        doc="Send a redemption Salesforce refused as \"ip restricted\" once more, through a different egress IP not "
        "known to be refused for the app, and give the app that second answer. Relies on a refused redemption "
        "not having rotated the refresh token (Salesforce blocks it entirely). Never for any other answer.",
    )
    egress_ips: Annotated[list[str], NoDecode] = _setting(
        default_factory=list,
        doc="Pin member egress IPs by hand: `MEMBER=IP,...`, e.g. `10.0.0.5:9293=52.1.2.3`.",
    )
    echo_url: str = _setting(
        DEFAULT_ECHO_URL, doc="IP echo probed through each member; answers `{\"ip\": ...}` or a bare IP."
    )
    probe_interval: float = _setting(60.0, ge=1.0, le=86400.0, doc="Seconds between probe rounds.")
    probe_samples: int = _setting(3, ge=1, le=20, doc="Echo requests per member per round.")
    confdir: Path = _setting(
        DEFAULT_CONFDIR,
        doc="The sidecar's private state: its CA with the private key (`mitmproxy-ca.pem`), `grants.key`, "
        "`grants.sqlite3`, the audit trail `audit.sqlite3`. Only the sidecar may read it: never share it with the app "
        "(share `SIDECAR_TRUST_DIR`).",
    )
    trust_dir: Path | None = _setting(
        None,
        shown_default="`SIDECAR_CONFDIR`",
        doc="Directory where the sidecar writes the files apps need to trust it (`ca.pem`, `ca-bundle.pem`, "
        "`truststore.p12`). Public files only: give the app this directory, read-only.",
    )
    replay_window: float = _setting(
        60.0,
        ge=0.0,
        le=3600.0,
        doc="Seconds during which a refresh token redemption that succeeded is answered again, from memory, to "
        "an identical request (same client credentials, same refresh token) instead of being sent: Salesforce "
        "would refuse it as a reuse. `0` turns replay off; concurrent identical redemptions are coalesced "
        "either way.",
    )
    redis_url: SecretStr | None = _setting(
        None,
        shown_default="unset (state stays in this process and `grants.sqlite3`)",
        doc="`redis://` or `rediss://` URL of a Redis the app's replicas share: the rotation shield (coalescing "
        "and replay) and refresh token tracking then work across replicas. Needs `SIDECAR_REDIS_KEY`. While it "
        "is unreachable, a refresh token redemption waits for it (at most 10 s: a restart is ridden out), then goes "
        "from this replica alone, not coordinated with the others until Redis is back.",
    )
    redis_key: SecretStr | None = _setting(
        None,
        doc="32-byte secret shared by the replicas (64 hex digits, or base64): encrypts the answers kept in Redis "
        "(AES-GCM) and keys the hashes of tokens, so replicas agree on them. E.g. `openssl rand -hex 32`.",
    )
    audit_retention: str = _setting(
        "400d",
        doc="How long the audit trail (`SIDECAR_CONFDIR/audit.sqlite3`: one record per token call, read with "
        "`egress-sidecar audit`) keeps a record: a number and a unit, `d`, `h`, `m` or `s`. Older records are "
        "pruned every 10 minutes. `0` keeps no trail on disk (the log line of each call still carries it).",
    )
    audit_max_rows: int = _setting(
        2_000_000,
        ge=1_000,
        le=100_000_000,
        doc="The audit trail's size bound: beyond this many records the oldest are pruned (about 256 bytes each "
        "on disk, so 2,000,000 records take about 500 MB).",
    )
    idle_policy: str = _setting(
        "30d",
        doc="The refresh token expiry that applies (Salesforce's \"expire if not used for\", sliding), for the "
        "idle warnings: a default, then per customer org overrides, e.g. `30d,00DXX0000001abcEAA=90d,"
        "00DYY0000002defEAA=never` (`h` or `d`, or `never`: valid until revoked; an org id of 15 or 18 "
        "characters). A grant warns past `expiry - min(5d, expiry/6)` idle (25 days of 30).",
    )
    ca_cert: Path | None = _setting(
        None,
        doc="Use this CA certificate (PEM) instead of generating one. Goes with `SIDECAR_CA_KEY`: both or "
        "neither; a mismatched pair or a non-CA certificate fails at start.",
    )
    ca_key: Path | None = _setting(None, doc="The unencrypted private key (PEM) of `SIDECAR_CA_CERT`.")
    upstream_ca: Path | None = _setting(
        None,
        doc="Extra CA bundle (PEM) trusted, in addition to the public roots, when verifying intercepted servers "
        "(a corporate CA; the tests' CA).",
    )
    connect_timeout: float = _setting(
        5.0,
        gt=0,
        le=120,
        doc="Deadline in seconds for setting up a token call's connection (TCP to the member, its CONNECT "
        "answer, TLS with Salesforce) and for a probe.",
    )
    response_timeout: float = _setting(
        30.0, gt=0, le=600, doc="Deadline in seconds for Salesforce's answer once a token call was sent."
    )
    max_connections: int = _setting(
        1000,
        ge=1,
        le=100_000,
        doc="Concurrent client connections served; beyond it new requests get `503 too_many_connections`.",
    )
    idle_timeout: int = _setting(
        300, ge=1, le=86400, doc="Seconds after which an idle client connection (or relayed tunnel) is closed."
    )
    proxy_auth: SecretStr | None = _setting(
        None, doc="`user:pass` required from proxy clients (Basic). Without it only loopback clients are served."
    )
    allow_private_destinations: bool = _setting(
        False,
        doc="With `SIDECAR_PROXY_AUTH` (a shared proxy), also connect to destinations in private ranges (10/8, "
        "172.16/12, 192.168/16, 100.64/10, fc00::/7). Loopback and link-local (169.254/16, fe80::/10) stay refused; "
        "the sidecar's own ports always are.",
    )
    log_format: Literal["json", "text"] = _setting("json", doc="`json` (one object per line) or `text`.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _setting(
        "INFO", doc="`DEBUG`, `INFO`, `WARNING`, `ERROR`."
    )

    @classmethod
    def settings_customise_sources(  # type: ignore[override]
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # pydantic-settings' own environment source; load_settings(env) swaps the process environment
        # for the mapping it was given (no .env file, no secrets directory: the environment is the contract).
        given = _GIVEN_ENV.get()
        return (init_settings, env_settings if given is None else _MappingEnvSource(settings_cls, given))

    @field_validator("pair", "token_hosts", "egress_ips", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", "route", "guard", "salesforce_tunnels", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            return value or None
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            scheme = urlsplit(value.get_secret_value().strip()).scheme
            if scheme not in ("redis", "rediss"):
                raise ValueError(f"scheme {scheme or '(none)'!r} is not supported: use redis:// or rediss:// (TLS)")
        return value

    @field_validator("redis_key")
    @classmethod
    def _check_redis_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            decode_key(value.get_secret_value())
        return value

    @field_validator("quotaguardstatic_url", "proxy_auth", "allowlist", "redis_url", "redis_key", mode="before")
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

    @field_validator("audit_retention")
    @classmethod
    def _check_audit_retention(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("idle_policy")
    @classmethod
    def _check_idle_policy(cls, value: str) -> str:
        parse_idle_policy(value)
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
        return "enforce" if self.upstream is not None else "observe"

    @property
    def retry_on_ip_restricted(self) -> bool:
        return self.retry_ip_restricted if self.retry_ip_restricted is not None else self.guard_mode == "enforce"

    @property
    def confdir_path(self) -> Path:
        return self.confdir.expanduser()

    @property
    def trust_dir_path(self) -> Path:
        """Where ca.pem and ca-bundle.pem go (SIDECAR_TRUST_DIR, else the confdir)."""
        return (self.trust_dir if self.trust_dir is not None else self.confdir).expanduser()

    @property
    def audit_retention_seconds(self) -> float:
        return parse_duration(self.audit_retention)

    @property
    def idle_expiry(self) -> IdlePolicy:
        return parse_idle_policy(self.idle_policy)

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]


# Settings whose value must never be echoed back in an error message.
_SECRET_FIELDS = {"quotaguardstatic_url", "proxy_auth", "redis_url", "redis_key"}

# The environment load_settings() was given, for the duration of that call (None: the process's).
_GIVEN_ENV: ContextVar[Mapping[str, str] | None] = ContextVar("egress_sidecar_given_env", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source (prefix, aliases, case rules) over a given mapping instead
    of ``os.environ``, so that a test's or a parent's environment cannot leak into the settings."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def env_name(field: str) -> str:
    """The environment variable of a Settings field."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, str):
        return alias
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def _field_of(key: Any) -> str | None:
    """The field an error location names (a field name, or an alias such as QUOTAGUARDSTATIC_URL)."""
    for field in Settings.model_fields:
        if key == field or str(key).upper() == env_name(field):
            return field
    return None


def _describe(err: dict[str, Any]) -> str:
    field = _field_of(err["loc"][0]) if err.get("loc") else None
    name = env_name(field) if field else str(err["loc"][0]) if err.get("loc") else "?"
    msg = str(err.get("msg", "invalid"))
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    hint = _HINTS.get(field or "", "")
    if field is None or field in _SECRET_FIELDS:
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
    "salesforce_tunnels": "Use one of: pair, direct.",
    "log_format": "Use json or text.",
    "log_level": "Use DEBUG, INFO, WARNING or ERROR.",
    "guard": "Use observe or enforce.",
    "egress_ips": "Example: SIDECAR_EGRESS_IPS=10.0.0.5:9293=52.1.2.3,10.0.0.6:9293=52.1.2.4.",
    "allowlist": "Copy the entries of the External Client App's Refresh Token IP Allowlist.",
    "proxy_auth": "Example: SIDECAR_PROXY_AUTH=app:long-random-password.",
    "redis_url": "Example: SIDECAR_REDIS_URL=redis://redis:6379/0.",
    "audit_retention": "Example: SIDECAR_AUDIT_RETENTION=400d.",
    "idle_policy": "Example: SIDECAR_IDLE_POLICY=30d,00DXX0000001abcEAA=90d.",
}


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``env`` (default: the process environment) or raise :class:`ConfigError`.

    pydantic-settings reads the variables itself (prefix, aliases, validators); with ``env`` given it
    reads that mapping and nothing else."""
    token = _GIVEN_ENV.set(dict(env) if env is not None else None)
    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(e) for e in exc.errors())) from None
    except AllowlistError as exc:  # raised from a validator outside pydantic's wrapping
        raise ConfigError(f"SIDECAR_ALLOWLIST: {exc}") from None
    except SettingsError as exc:  # pydantic-settings could not decode a value (its message names the field)
        raise ConfigError(str(exc)) from None
    finally:
        _GIVEN_ENV.reset(token)
    _check_files(settings)
    return settings


def unknown_settings(env: Mapping[str, str] | None = None) -> list[str]:
    """``SIDECAR_*`` variables that are not settings (typos; warned about, not fatal, since
    Kubernetes injects ``SIDECAR_SERVICE_HOST``-style variables for a Service named ``sidecar``)."""
    source = os.environ if env is None else env
    known = {env_name(f) for f in Settings.model_fields}
    return sorted(k for k in source if k.upper().startswith("SIDECAR_") and k.upper() not in known)


def _check_files(settings: Settings) -> None:
    for field in ("upstream_ca", "ca_cert", "ca_key"):
        path = getattr(settings, field)
        if path is not None and not Path(path).expanduser().is_file():
            raise ConfigError(f"{env_name(field)}: {str(path)!r} is not a readable file. Point it at a PEM file.")
    if (settings.redis_url is None) != (settings.redis_key is None):
        raise ConfigError(
            "SIDECAR_REDIS_URL and SIDECAR_REDIS_KEY go together: the key encrypts what the replicas share in "
            "Redis. Set both (SIDECAR_REDIS_KEY=$(openssl rand -hex 32), the same on every replica) or neither."
        )
    if (settings.ca_cert is None) != (settings.ca_key is None):
        raise ConfigError(
            "SIDECAR_CA_CERT and SIDECAR_CA_KEY go together: set both (the CA certificate and its key) or neither."
        )
    if settings.guard == "enforce" and settings.upstream is None:
        raise ConfigError(
            "SIDECAR_GUARD=enforce needs QUOTAGUARDSTATIC_URL: without the pair there is no allowlisted egress to "
            "choose, so nothing can be enforced. Set the upstream, or use SIDECAR_GUARD=observe."
        )


# ------------------------------------------------------------------ documentation from the Fields


@dataclass(frozen=True)
class SettingDoc:
    """One row of the configuration table: variable, default and meaning (Markdown)."""

    name: str
    default: str
    meaning: str


def _shown_default(info: FieldInfo) -> str:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "shown_default" in extra:
        return str(extra["shown_default"])
    value = info.get_default(call_default_factory=True)
    if value is None or value == []:
        return "unset"
    if isinstance(value, list):
        value = ",".join(value)
    elif isinstance(value, bool):  # as the environment spells it (SIDECAR_X=false), not Python's False
        value = str(value).lower()
    elif isinstance(value, float):
        value = f"{value:g}"
    return f"`{value}`"


def setting_docs() -> list[SettingDoc]:
    """Every setting, in the Settings model's order."""
    docs = []
    for field, info in Settings.model_fields.items():
        assert info.description, f"Settings.{field} has no description (its help text)"
        docs.append(SettingDoc(env_name(field), _shown_default(info), info.description))
    return docs


def settings_markdown() -> str:
    """The configuration table of docs/configuration.md."""
    rows = [f"| `{d.name}` | {d.default} | {d.meaning} |" for d in setting_docs()]
    return "\n".join(["| Variable | Default | Meaning |", "|---|---|---|", *rows]) + "\n"


def settings_help(width: int = 100) -> str:
    """The ``--help`` epilog: every variable with its default and meaning, as plain text."""
    lines = ["configuration (environment variables; docs/configuration.md has the same table):"]
    for d in setting_docs():
        lines.append(f"  {d.name}  (default: {d.default.replace('`', '')})")
        lines += textwrap.wrap(d.meaning.replace("`", ""), width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines) + "\n"


# The page that holds the generated table (relative to the repository root), between these markers.
SETTINGS_PAGE = "docs/configuration.md"
SETTINGS_TABLE_START = "<!-- settings table: generated from sidecar/config.py by `make docs`; do not edit -->"
SETTINGS_TABLE_END = "<!-- end of settings table -->"


def with_settings_table(page: str) -> str:
    """``page`` with the text between the two markers replaced by :func:`settings_markdown`."""
    start, end = page.index(SETTINGS_TABLE_START), page.index(SETTINGS_TABLE_END)
    return page[: start + len(SETTINGS_TABLE_START)] + "\n" + settings_markdown() + page[end:]


def write_settings_table(path: str | Path = SETTINGS_PAGE) -> None:
    """`make docs`: rewrite the configuration table of ``path`` (docs/configuration.md) from the Fields."""
    p = Path(path)
    p.write_text(with_settings_table(p.read_text()))
