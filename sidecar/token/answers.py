"""The answers the sidecar gives the app itself, instead of Salesforce's: what went wrong, whether
anything reached Salesforce, and what to do. JSON like Salesforce's own errors, plus
``sent_to_salesforce`` (true / false / "unknown") so an app can tell a safe retry from a risky one.
Every local answer to a token call is made here, and only here."""

from __future__ import annotations

import json
from typing import Any

from sidecar.egress.guard import Guard
from sidecar.token.messages import Answer


def local_answer(status: int, error: str, description: str, sent: bool | str = False,
                 extra: dict[str, Any] | None = None) -> Answer:
    body: dict[str, Any] = {"error": error, "error_description": "egress-sidecar: " + description, **(extra or {}),
                            "sent_to_salesforce": sent}
    headers = [(b"Content-Type", b"application/json"), (b"X-Egress-Sidecar", error.encode())]
    if status == 503:
        headers.append((b"Retry-After", b"30"))
    return Answer(status, headers, json.dumps(body).encode(), local=True)


def blocked(guard: Guard, reason: str) -> Answer:
    return local_answer(
        503, "egress_not_allowlisted", "refused to send this token call: " + reason,
        extra={
            "missing_from_allowlist": guard.missing_ips(),
            "pair": [
                {"member": m.label, "egress_ip": m.egress_ip, "allowlisted": guard.is_allowlisted(m.egress_ip),
                 "up": m.up}
                for m in guard.pair.members
            ],
        },
    )


def failed_after_send(via: str, detail: str) -> Answer:
    return local_answer(
        502, "upstream_failed_after_send",
        f"the token request was sent ({via}) but no complete answer came back: {detail}. It was not retried, "
        "because Salesforce rotates refresh tokens and the request may have been processed; if it was a "
        "refresh, the app's stored refresh token may now be stale.",
        sent="unknown",
    )


def unreachable(tried: list[str], detail: str) -> Answer:
    return local_answer(
        502, "upstream_unreachable",
        f"no byte of the token request was sent (tried {', '.join(tried)}): {detail}. It is safe to retry.",
    )


def redemption_in_flight() -> Answer:
    return local_answer(
        503, "redemption_in_flight",
        "an identical redemption of this refresh token is still in flight on another replica (SIDECAR_REDIS_URL); "
        "this one was not sent, so the token was not redeemed twice. Retry shortly: once that redemption is "
        "answered, an identical one gets its answer again.",
    )


def redis_unreachable() -> Answer:
    return local_answer(
        503, "redis_unreachable",
        "the Redis the replicas share (SIDECAR_REDIS_URL) is unreachable, and without it this replica cannot know "
        "whether another one is redeeming the same refresh token right now; this redemption was not sent, so the "
        "token is still valid. Retry shortly.",
    )


_LOCAL_OUTCOMES = {"egress_not_allowlisted": "blocked", "upstream_failed_after_send": "upstream_error",
                   "upstream_unreachable": "upstream_error", "redemption_in_flight": "upstream_error",
                   "redis_unreachable": "upstream_error"}


def local_outcome(answer: Answer) -> str | None:
    """The outcome of one of the answers above, from its X-Egress-Sidecar header (None: not local)."""
    if not answer.local:
        return None
    error = next((v.decode() for k, v in answer.headers if k == b"X-Egress-Sidecar"), "")
    return _LOCAL_OUTCOMES.get(error, "client_error")
