"""Token call detection and outcome classification: pure code, every branch."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.token.call import (
    classify_response,
    grant_type,
    host_class,
    is_token_request,
    issued_refresh_token,
    request_fields,
    subject_to_allowlist,
)
from sidecar.token.hosts import DOMAIN_CLASSES, salesforce_domain_class

FORM = "application/x-www-form-urlencoded"


def body(error: str, description: str) -> bytes:
    return json.dumps({"error": error, "error_description": description}).encode()


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/services/oauth2/token", True),
        ("post", "/services/oauth2/token?x=1", True),
        ("POST", "/services/oauth2/token/", True),
        ("GET", "/services/oauth2/token", False),
        ("POST", "/services/oauth2/authorize", False),
        ("POST", "/services/oauth2/tokenx", False),
        ("POST", "/services/data/v60.0/", False),
        # Forms a server may route to the token endpoint: never let one slip past the guard.
        ("POST", "//services/oauth2/token", True),
        ("POST", "/services/./oauth2/token", True),
        ("POST", "/services/oauth2/../oauth2/token", True),
        ("POST", "/services/%6Fauth2/%74oken", True),
        ("POST", "/services%2Foauth2%2Ftoken", True),
        ("POST", "/Services/OAuth2/Token", True),
        ("POST", "/services/oauth2/token;jsessionid=1", True),
        ("POST", "/services//oauth2///token//?x=1", True),
        ("POST", "\\services\\oauth2\\token", True),
        ("post", "/services/oauth2/token", True),
        ("POST", "/services/oauth2/tokens", False),
        ("POST", "/services/oauth2/token/..", False),
        ("POST", "/services/oauth2/%2574oken", False),  # decoded once, as servers do
        # Experience Cloud sites serve OAuth under the site's path ("use the full path to the site URL"):
        # any path ending in the token endpoint is a token call, as leniently matched as the bare one.
        ("POST", "/x/services/oauth2/token", True),
        ("POST", "/customers/services/oauth2/token", True),
        ("POST", "/s/services/oauth2/token", True),
        ("POST", "/partners/portal/services/oauth2/token?so=00D", True),
        ("POST", "//Customers//services/./OAuth2/%74oken/", True),
        ("POST", "/customers;x=1/services/oauth2/token;jsessionid=2", True),
        ("POST", "\\customers\\services\\oauth2\\token", True),
        ("POST", "/customers/services/oauth2/tokens", False),
        ("POST", "/customers/xservices/oauth2/token", False),
        ("POST", "/customers/services/oauth2/token/..", False),
        ("GET", "/customers/services/oauth2/token", False),
        ("POST", "/customers/services/oauth2/authorize", False),
    ],
)
def test_is_token_request(method: str, path: str, expected: bool) -> None:
    assert is_token_request(method, path) is expected


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"grant_type=refresh_token&refresh_token=abc&client_id=x", "refresh_token"),
        (b"grant_type=authorization_code&code=c", "authorization_code"),
        (b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=x", "jwt_bearer"),
        (b"grant_type=client_credentials", "client_credentials"),
        (b"grant_type=password&username=u&password=p", "password"),
        (b"grant_type=urn:ietf:params:oauth:grant-type:device_code", "other"),
        (b"grant_type=refresh_token&grant_type=password", "other"),  # duplicated: not trusted
        (b"refresh_token=abc", "other"),
        (b"\xff\xfe\xfa", "other"),
        (b"", "other"),
    ],
)
def test_grant_type(content: bytes, expected: str) -> None:
    assert grant_type(FORM, content) == expected


def test_grant_type_needs_form_body() -> None:
    assert grant_type("application/json", b'{"grant_type":"refresh_token"}') == "other"
    assert grant_type(None, b"grant_type=refresh_token") == "refresh_token"


@pytest.mark.parametrize(
    ("status", "content", "outcome", "code"),
    [
        (200, b'{"access_token":"x"}', "success", None),
        (400, body("invalid_grant", "ip restricted by app developer"), "ip_restricted", "invalid_grant"),
        (400, body("invalid_grant", "IP RESTRICTED or invalid login hours"), "ip_restricted", "invalid_grant"),
        (400, body("invalid_grant", "ip restricted"), "ip_restricted", "invalid_grant"),
        (400, body("invalid_grant", "expired access/refresh token"), "invalid_grant", "invalid_grant"),
        (400, body("invalid_client_id", "client identifier invalid"), "client_error", "invalid_client_id"),
        (400, body("made_up", "x"), "client_error", "other"),
        (401, b"not json", "client_error", None),
        (500, body("server_error", "x"), "server_error", "server_error"),
        (503, b"<html>", "server_error", None),
        (400, b"[1,2]", "client_error", None),
        (400, b'{"error": 5, "error_description": null}', "client_error", None),
        # "ip restricted" only counts for invalid_grant.
        (400, body("invalid_request", "ip restricted by app developer"), "client_error", "invalid_request"),
    ],
)
def test_classify_response(status: int, content: bytes, outcome: str, code: str | None) -> None:
    result = classify_response(status, content)
    assert (result.outcome, result.error_code) == (outcome, code)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=100, max_value=599), st.binary(max_size=300))
def test_classify_never_raises(status: int, content: bytes) -> None:
    assert classify_response(status, content).outcome in {
        "success", "ip_restricted", "invalid_grant", "client_error", "server_error"
    }


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.sampled_from([FORM, None, "text/plain"]))
def test_grant_type_never_raises(text: str, ctype: str | None) -> None:
    assert grant_type(ctype, text.encode("utf-8", "surrogatepass")) in {
        "refresh_token", "authorization_code", "jwt_bearer", "client_credentials", "password", "other"
    }


def test_rotation_detection() -> None:
    assert issued_refresh_token(b'{"access_token":"a","refresh_token":"r"}') == "r"
    assert issued_refresh_token(b'{"access_token":"a"}') is None
    assert issued_refresh_token(b'{"refresh_token":""}') is None
    assert issued_refresh_token(b"garbage") is None


def test_grant_type_from_query_string_too() -> None:
    # Salesforce reads token parameters from the query string as well as the body.
    assert grant_type(FORM, b"", "grant_type=refresh_token&refresh_token=x") == "refresh_token"
    assert grant_type(None, b"refresh_token=x", "grant_type=authorization_code") == "authorization_code"
    # The same parameter in both places is ambiguous, and so not trusted.
    assert grant_type(FORM, b"grant_type=password", "grant_type=refresh_token") == "other"
    assert request_fields("application/json", b"grant_type=x", "a=1") == {"a": ["1"]}


def test_unknown_grants_are_treated_as_subject_to_the_allowlist() -> None:
    assert subject_to_allowlist("refresh_token") and subject_to_allowlist("authorization_code")
    assert subject_to_allowlist("other")
    assert not subject_to_allowlist("jwt_bearer") and not subject_to_allowlist("client_credentials")


@pytest.mark.parametrize(
    ("host", "cls"),
    [
        ("login.salesforce.com", "login"),
        ("test.salesforce.com", "test"),
        ("acme.my.salesforce.com", "my_domain"),
        ("acme--uat.sandbox.my.salesforce.com", "sandbox_my_domain"),
        ("acme-dev-ed.develop.my.salesforce.com", "my_domain"),  # partitioned: still the org's My Domain
        ("acme.my.site.com", "experience_cloud"),
        ("acme--uat.sandbox.my.site.com", "experience_cloud"),
        ("acme.force.com", "experience_cloud"),  # a legacy site domain
        ("acme.lightning.force.com", "custom"),  # (not a token host by default; added by hand: custom)
        ("agency.my.salesforce.mil", "government"),
        ("auth.acme.com", "custom"),
    ],
)
def test_host_class_is_bounded(host: str, cls: str) -> None:
    assert host_class(host) == cls


def test_long_paths_are_judged_the_same_and_never_kept() -> None:
    """Paths are normalised once each (cached), except long ones, which are worked out every time: a client
    cannot fill memory with made-up 64 KiB paths, and the answer is the same either way."""
    from sidecar.token.call import MAX_CACHED_PATH, _normalized_cached

    _normalized_cached.cache_clear()
    long_token_path = "/" * (MAX_CACHED_PATH + 10) + "services/./oauth2/token"
    assert is_token_request("POST", long_token_path)
    assert not is_token_request("POST", "/services/data/" + "x" * (MAX_CACHED_PATH + 10))
    assert _normalized_cached.cache_info().currsize == 0
    assert is_token_request("POST", "//services/oauth2/token")
    assert _normalized_cached.cache_info().currsize == 1


@pytest.mark.parametrize(
    ("host", "cls"),
    [
        ("acme.lightning.force.com", "force"),
        ("acme--uat.sandbox.lightning.force.com", "force"),
        ("acme--c.vf.force.com", "force"),
        ("usa77.salesforce.com", "salesforce"),
        ("API.Salesforce.com.", "salesforce"),
        ("salesforce.com", "salesforce"),
        ("acme.my.salesforce-sites.com", "salesforce_sites"),
        ("acme.preview.salesforce-experience.com", "experience"),
        ("acme--c.documentforce.com", "content"),
        ("acme.my.salesforce-setup.com", "setup"),
        ("x.lightning.crmforce.mil", "government"),
        ("x.lightning.force.mil", "government"),
        ("x.my.sfcrmproducts.cn", "china"),
        ("x.sfdcopens.com", "other"),
        ("evilsalesforce.com", None),
        ("salesforce.com.evil.example", None),
        ("force.com.example", None),
        ("example.com", None),
        ("127.0.0.1", None),
    ],
)
def test_salesforce_domain_class_is_bounded(host: str, cls: str | None) -> None:
    assert salesforce_domain_class(host) == cls
    assert cls is None or cls in DOMAIN_CLASSES


@pytest.mark.parametrize(("url", "expected"), [
    ("https://login.salesforce.com/id/00D5e000000AbCdEAA/0055e000001XyZwAAC", ("00D5e000000AbCdEAA", "0055e000001XyZwAAC")),
    ("https://acme.my.salesforce.com/id/00D5e000000AbCd/0055e000001XyZw", ("00D5e000000AbCd", "0055e000001XyZw")),
    ("https://test.salesforce.com/id/00D5e000000AbCdEAA/0055e000001XyZwAAC/", ("00D5e000000AbCdEAA", "0055e000001XyZwAAC")),
    ("https://login.salesforce.com/id/0055e000001XyZwAAC/00D5e000000AbCdEAA", None),  # user and org swapped
    ("https://login.salesforce.com/id/00D5e000000AbCdEA/0055e000001XyZwAAC", None),  # 17 characters
    ("http://login.salesforce.com/id/00D5e000000AbCdEAA/0055e000001XyZwAAC", None),
    ("https://login.salesforce.com/id/00D5e000000AbCdEAA/0055e000001XyZwAAC?x=1", None),
    (42, None),
])
def test_the_org_and_user_of_an_answer_come_from_its_id_url(url: object, expected: tuple[str, str] | None) -> None:
    from sidecar.token.call import Identity, answer_grant, answer_identity

    body = json.dumps({"access_token": "00D!x", "refresh_token": "RT", "id": url}).encode()
    assert answer_identity(body) == (Identity(*expected) if expected else None)
    assert answer_grant(body)[0] == "RT"
    assert answer_grant(b"not json") == (None, None) and answer_grant(b"[1]") == (None, None)
