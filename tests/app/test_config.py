"""Settings: defaults, parsing, and that every bad value fails with a message naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sidecar.config import (
    ConfigError,
    HostPort,
    Settings,
    env_name,
    load_settings,
    parse_host_port,
    unknown_settings,
)
from sidecar.token.hosts import TokenHosts


def test_defaults() -> None:
    s = load_settings({})
    assert s.listen_address == HostPort("127.0.0.1", 3128)
    assert s.admin_address == HostPort("0.0.0.0", 9464)
    assert s.upstream is None
    assert s.route == "token" and s.salesforce_tunnels == "pair"
    assert s.guard_mode == "observe"
    assert s.log_format == "json"
    assert "*.my.salesforce.com" in s.token_hosts


def test_environment_is_not_read_implicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_ROUTE", "all")
    assert load_settings({}).route == "token"
    assert load_settings().route == "all"


def test_upstream_and_pair() -> None:
    s = load_settings(
        {
            "QUOTAGUARDSTATIC_URL": "http://us%40er:p%3Ass@proxy.example:9293",
            "SIDECAR_PAIR": "10.0.0.5:9293, 10.0.0.6:9293",
            "SIDECAR_EGRESS_IPS": "10.0.0.5:9293=52.1.2.3",
        }
    )
    up = s.upstream
    assert up is not None and (up.host, up.port, up.username) == ("proxy.example", 9293, "us@er")
    assert up.password.get_secret_value() == "p:ss"
    assert "p:ss" not in up.redacted() and "p%3Ass" not in repr(s)
    assert s.pair_members == [HostPort("10.0.0.5", 9293), HostPort("10.0.0.6", 9293)]
    assert s.pinned_egress == {HostPort("10.0.0.5", 9293): "52.1.2.3"}


def test_guard_defaults_to_enforce_whenever_a_pair_is_configured() -> None:
    pair = {"QUOTAGUARDSTATIC_URL": "http://u:p@h:9293"}
    assert load_settings({**pair, "SIDECAR_ALLOWLIST": "52.1.2.3"}).guard_mode == "enforce"
    assert load_settings(pair).guard_mode == "enforce"  # on Salesforce's answers alone
    assert load_settings({**pair, "SIDECAR_ALLOWLIST": "52.1.2.3", "SIDECAR_GUARD": "observe"}).guard_mode == "observe"
    assert load_settings({"SIDECAR_ALLOWLIST": "52.1.2.3"}).guard_mode == "observe"  # direct mode: nothing to enforce
    # The retry of a refused redemption follows the guard unless set; the evidence TTL has a default.
    assert load_settings(pair).retry_on_ip_restricted is True
    assert load_settings({**pair, "SIDECAR_GUARD": "observe"}).retry_on_ip_restricted is False
    assert load_settings({**pair, "SIDECAR_RETRY_IP_RESTRICTED": "false"}).retry_on_ip_restricted is False
    assert load_settings(pair).evidence_ttl == 900.0


@pytest.mark.parametrize(
    ("env", "name", "fragment"),
    [
        ({"SIDECAR_LISTEN": "nonsense"}, "SIDECAR_LISTEN", "HOST:PORT"),
        ({"SIDECAR_LISTEN": "127.0.0.1:99999"}, "SIDECAR_LISTEN", "out of range"),
        ({"SIDECAR_ADMIN_LISTEN": "x:y"}, "SIDECAR_ADMIN_LISTEN", "HOST:PORT"),
        ({"SIDECAR_ROUTE": "everything"}, "SIDECAR_ROUTE", "token, salesforce, all"),
        ({"SIDECAR_SALESFORCE_TUNNELS": "decrypt"}, "SIDECAR_SALESFORCE_TUNNELS", "pair, direct"),
        ({"SIDECAR_GUARD": "strict"}, "SIDECAR_GUARD", "observe or enforce"),
        ({"SIDECAR_EVIDENCE_TTL": "0"}, "SIDECAR_EVIDENCE_TTL", "greater than or equal to 1"),
        ({"SIDECAR_RETRY_IP_RESTRICTED": "sometimes"}, "SIDECAR_RETRY_IP_RESTRICTED", "valid boolean"),
        ({"SIDECAR_GUARD": "enforce", "SIDECAR_ALLOWLIST": "1.2.3.4"}, "SIDECAR_GUARD", "QUOTAGUARDSTATIC_URL"),
        ({"SIDECAR_TOKEN_HOSTS": "login*.salesforce.com"}, "SIDECAR_TOKEN_HOSTS", "may only lead"),
        ({"SIDECAR_LOG_FORMAT": "xml"}, "SIDECAR_LOG_FORMAT", "json or text"),
        ({"SIDECAR_PROBE_INTERVAL": "0"}, "SIDECAR_PROBE_INTERVAL", "greater than or equal"),
        ({"SIDECAR_CONNECT_TIMEOUT": "soon"}, "SIDECAR_CONNECT_TIMEOUT", "number"),
        ({"SIDECAR_PAIR": "10.0.0.5"}, "SIDECAR_PAIR", "HOST:PORT"),
        ({"SIDECAR_EGRESS_IPS": "10.0.0.5:1"}, "SIDECAR_EGRESS_IPS", "MEMBER=IP"),
        ({"SIDECAR_TOKEN_HOSTS": "https://login.salesforce.com/"}, "SIDECAR_TOKEN_HOSTS", "host name"),
        ({"SIDECAR_ALLOWLIST": "1.2.3.400"}, "SIDECAR_ALLOWLIST", "1.2.3.400"),
        ({"SIDECAR_CA_CERT": "/nonexistent.pem"}, "SIDECAR_CA_CERT", "readable file"),
        ({"QUOTAGUARDSTATIC_URL": "socks5://u:p@h:1080"}, "QUOTAGUARDSTATIC_URL", "http://USER:PASS@HOST"),
        ({"QUOTAGUARDSTATIC_URL": "http://proxy.example:9293"}, "QUOTAGUARDSTATIC_URL", "USER:PASS"),
        ({"SIDECAR_PROXY_AUTH": "nocolon"}, "SIDECAR_PROXY_AUTH", "user:password"),
        ({"SIDECAR_AUDIT_RETENTION": "400"}, "SIDECAR_AUDIT_RETENTION", "a number and a unit"),
        ({"SIDECAR_AUDIT_RETENTION": "forever"}, "SIDECAR_AUDIT_RETENTION", "not a duration"),
        ({"SIDECAR_AUDIT_MAX_ROWS": "10"}, "SIDECAR_AUDIT_MAX_ROWS", "greater than or equal to 1000"),
        ({"SIDECAR_IDLE_POLICY": "30d 90d"}, "SIDECAR_IDLE_POLICY", "ORG_ID=EXPIRY"),
        ({"SIDECAR_IDLE_POLICY": "30 days"}, "SIDECAR_IDLE_POLICY", "not a duration"),
        ({"SIDECAR_IDLE_POLICY": "30d,00DXX=90d"}, "SIDECAR_IDLE_POLICY", "not a Salesforce org id"),
        ({"SIDECAR_IDLE_POLICY": "30d,00DXX0000001abc=0d"}, "SIDECAR_IDLE_POLICY", "longer than 0"),
        ({"SIDECAR_IDLE_POLICY": "30d,00DXX0000001abc=9d,00DXX0000001abc2AA=8d"}, "SIDECAR_IDLE_POLICY", "given twice"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], name: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    message = str(info.value)
    assert message.startswith(name), message
    assert fragment in message, message


def test_the_idle_policy_and_the_audit_retention() -> None:
    s = load_settings({})
    assert s.audit_retention_seconds == 400 * 86400 and s.audit_max_rows == 2_000_000
    policy = s.idle_expiry
    assert policy.expiry(None) == policy.expiry("00D000000000001EAA") == 30 * 86400
    assert policy.state(None, 24 * 86400) is None and policy.state(None, 25.5 * 86400) == "expiring"
    assert policy.state(None, 30.5 * 86400) == "expired"
    s = load_settings({"SIDECAR_IDLE_POLICY": "7d, 00DXX0000001abc=90d  00DYY0000002defEAA=never",
                       "SIDECAR_AUDIT_RETENTION": "36h"})
    policy = s.idle_expiry
    assert s.audit_retention_seconds == 36 * 3600
    assert policy.expiry("00DXX0000001abc2AA") == 90 * 86400  # a 15-character id is read as its 18-character form
    assert policy.expiry("00DYY0000002defEAA") is None and policy.state("00DYY0000002defEAA", 1e9) is None
    assert policy.expiry("00DZZ0000003ghiEAA") == 7 * 86400 and policy.warn_after(None) == 7 * 86400 - 7 * 86400 / 6
    assert policy.state("00DXX0000001abc2AA", 85.5 * 86400) == "expiring"  # five days before its 90
    assert [policy.describe(o) for o in (None, "00DXX0000001abc2AA", "00DYY0000002defEAA")] == ["7d", "90d", "never"]
    assert load_settings({"SIDECAR_AUDIT_RETENTION": "0"}).audit_retention_seconds == 0  # no trail on disk


def test_secret_values_never_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"QUOTAGUARDSTATIC_URL": "ftp://user:hunter2secret@h:1"})
    assert "hunter2secret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings({"SIDECAR_PROXY_AUTH": "hunter2secret"})
    assert "hunter2secret" not in str(info.value)


def test_unknown_variables_are_reported_not_fatal() -> None:
    env = {"SIDECAR_LISTN": "127.0.0.1:1", "SIDECAR_ROUTE": "all"}
    assert unknown_settings(env) == ["SIDECAR_LISTN"]
    assert load_settings(env).route == "all"


def test_every_field_has_an_env_name() -> None:
    names = {env_name(f) for f in Settings.model_fields}
    assert "QUOTAGUARDSTATIC_URL" in names and "SIDECAR_LISTEN" in names and len(names) == len(Settings.model_fields)


def test_host_port_forms() -> None:
    assert parse_host_port("[::1]:3128") == HostPort("::1", 3128)
    assert str(HostPort("::1", 3128)) == "[::1]:3128"
    assert parse_host_port("proxy", default_port=9293) == HostPort("proxy", 9293)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_config_values_fail_only_with_config_error(value: str) -> None:
    for key in ("SIDECAR_LISTEN", "SIDECAR_PAIR", "QUOTAGUARDSTATIC_URL", "SIDECAR_EGRESS_IPS", "SIDECAR_TOKEN_HOSTS"):
        try:
            load_settings({key: value})
        except ConfigError as exc:
            assert key in str(exc)


def test_token_host_patterns() -> None:
    hosts = TokenHosts(load_settings({}).token_hosts)
    assert hosts.matches("login.salesforce.com")
    assert hosts.matches("LOGIN.salesforce.com.")
    assert hosts.matches("acme.my.salesforce.com")
    assert hosts.matches("acme--uat.sandbox.my.salesforce.com")
    for partition in ("develop", "scratch", "patch", "demo", "trailblaze"):  # partitioned My Domains (ISV orgs)
        assert hosts.matches(f"acme-dev-ed.{partition}.my.salesforce.com"), partition
        assert hosts.certificate_name(f"acme-dev-ed.{partition}.my.salesforce.com") == f"*.{partition}.my.salesforce.com"
    assert not hosts.matches("a.b.develop.my.salesforce.com")
    for partition in ("sandbox", "develop", "scratch", "patch", "demo", "trailblaze"):  # Experience Cloud sites too
        assert hosts.matches(f"acme--uat.{partition}.my.site.com"), partition
    assert hosts.matches("acme.my.site.com")
    assert hosts.matches("acme.force.com")  # a legacy Experience Cloud site domain
    assert hosts.matches("agency.my.salesforce.mil")  # Government Cloud Plus (by analogy)
    for other in ("acme.lightning.force.com", "acme--c.vf.force.com", "usa77.salesforce.com",
                  "acme.my.salesforce-sites.com"):  # Salesforce's, but no token endpoint: relayed, not intercepted
        assert not hosts.matches(other), other
    assert not hosts.matches("evil-login.salesforce.com")
    assert not hosts.matches("my.salesforce.com")
    assert not hosts.matches("acme.my.salesforce.com.evil.com")
    assert not hosts.matches("example.com")


def test_trust_dir_defaults_to_the_confdir_and_is_expanded(tmp_path) -> None:
    s = load_settings({"SIDECAR_CONFDIR": str(tmp_path / "state")})
    assert s.trust_dir is None and s.trust_dir_path == tmp_path / "state"
    s = load_settings({"SIDECAR_CONFDIR": str(tmp_path / "state"), "SIDECAR_TRUST_DIR": "~/trust"})
    assert s.trust_dir_path == Path.home() / "trust" and s.confdir_path == tmp_path / "state"
    assert load_settings({}).trust_dir_path == load_settings({}).confdir_path == Path.home() / ".egress-sidecar"


def test_pydantic_settings_reads_the_environment_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings() alone reads os.environ through pydantic-settings (prefix, alias, validators);
    load_settings(env) reads only env, and leaves Settings() reading os.environ afterwards."""
    monkeypatch.setenv("SIDECAR_LISTEN", "127.0.0.1:4000")
    monkeypatch.setenv("SIDECAR_PAIR", "10.0.0.5:9293, 10.0.0.6:9293")
    monkeypatch.setenv("QUOTAGUARDSTATIC_URL", "http://u:p@proxy.example:9293")
    s = Settings()
    assert s.listen == "127.0.0.1:4000" and s.pair == ["10.0.0.5:9293", "10.0.0.6:9293"]
    assert s.upstream is not None and s.upstream.host == "proxy.example"
    given = load_settings({"SIDECAR_LISTEN": "127.0.0.1:5000"})
    assert given.listen == "127.0.0.1:5000" and given.upstream is None and given.pair == []
    assert Settings().listen == "127.0.0.1:4000"
    monkeypatch.setenv("SIDECAR_ROUTE", "everywhere")
    with pytest.raises(ValidationError):
        Settings()


def test_names_are_case_insensitive() -> None:
    s = load_settings({"sidecar_route": "all", "quotaguardstatic_url": "http://u:p@h:9293"})
    assert s.route == "all" and s.upstream is not None
    assert unknown_settings({"sidecar_route": "all", "sidecar_rout": "all"}) == ["sidecar_rout"]


def test_errors_name_the_alias_with_its_hint() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"QUOTAGUARDSTATIC_URL": "http://proxy.example:9293"})
    assert str(info.value).startswith("QUOTAGUARDSTATIC_URL: ") and "QuotaGuard dashboard" in str(info.value)


def test_several_bad_values_one_line_each() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"SIDECAR_LISTEN": "x", "SIDECAR_ROUTE": "y", "SIDECAR_PROXY_AUTH": "secretvalue"})
    lines = str(info.value).splitlines()
    assert [line.split(" ")[0].rstrip(":") for line in lines] == ["SIDECAR_LISTEN", "SIDECAR_ROUTE", "SIDECAR_PROXY_AUTH"]
    assert "secretvalue" not in str(info.value)


def test_cli_exits_2_with_one_line_naming_the_variable(tmp_path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("SIDECAR_", "QUOTAGUARD"))}
    env["QUOTAGUARDSTATIC_URL"] = "ftp://user:hunter2secret@h:1"
    proc = subprocess.run([sys.executable, "-m", "sidecar", "run"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("egress-sidecar: configuration error: QUOTAGUARDSTATIC_URL: ")
    assert "hunter2secret" not in proc.stderr and "Traceback" not in proc.stderr
