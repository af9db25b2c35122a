"""NO_PROXY entries that send Salesforce token calls around the sidecar are found, and only those."""

from __future__ import annotations

import pytest

from sidecar.config import load_settings
from sidecar.ops.noproxy import bypass_warnings, salesforce_entries

TOKEN_HOSTS = tuple(load_settings({}).token_hosts)


@pytest.mark.parametrize("entry", [
    "*", "salesforce.com", ".salesforce.com", "*.salesforce.com", "SALESFORCE.COM.", "login.salesforce.com",
    "login.salesforce.com:443", "acme.my.salesforce.com", ".my.salesforce.com", "force.com", ".force.com",
    "acme.my.site.com", "site.com", "com", ".com", "acme--dev.sandbox.my.salesforce.com", "test.salesforce.com",
    "acme.lightning.force.com",
])
def test_entries_that_bypass_salesforce_are_found(entry: str) -> None:
    assert salesforce_entries(f"localhost,127.0.0.1,{entry},.svc", TOKEN_HOSTS) == [entry]


@pytest.mark.parametrize("entry", [
    "localhost", "127.0.0.1", "::1", "[::1]", ".svc", ".cluster.local", "10.0.0.0/8", "example.com",
    "notsalesforce.com", "salesforce.com.evil.example", "site.community", "", " ",
])
def test_other_entries_are_left_alone(entry: str) -> None:
    assert salesforce_entries(f"localhost,{entry}", TOKEN_HOSTS) == []


def test_a_custom_token_host_counts_as_well() -> None:
    assert salesforce_entries("auth.acme.example", ("auth.acme.example",)) == ["auth.acme.example"]
    assert salesforce_entries(".acme.example", ("auth.acme.example",)) == [".acme.example"]
    assert salesforce_entries("auth.acme.example", TOKEN_HOSTS) == []


def test_spaces_separate_entries_too_and_each_variable_is_named() -> None:
    env = {"NO_PROXY": "localhost .force.com", "no_proxy": "localhost,127.0.0.1"}
    (line,) = bypass_warnings(env, TOKEN_HOSTS)
    assert line.startswith("NO_PROXY lists .force.com: ") and "Remove it from NO_PROXY" in line
    env["no_proxy"] = "salesforce.com,force.com"
    assert [w.split(" lists ")[0] for w in bypass_warnings(env, TOKEN_HOSTS)] == ["NO_PROXY", "no_proxy"]
    assert bypass_warnings({"NO_PROXY": "localhost,127.0.0.1,::1"}, TOKEN_HOSTS) == []
