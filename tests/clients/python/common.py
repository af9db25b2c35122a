"""What every Python client of the matrix shares: the refresh form and the one-line JSON report.

The test passes the Salesforce side in SF_* variables; the proxy and trust settings are whatever the
client row of docs/clients.md sets, and the clients' own code reads nothing else.
"""

import json
import os


def token_url() -> str:
    return os.environ["SF_TOKEN_URL"]


def refresh_form() -> dict[str, str]:
    return {
        "grant_type": "refresh_token",
        "refresh_token": os.environ["SF_REFRESH_TOKEN"],
        "client_id": os.environ["SF_CLIENT_ID"],
        "client_secret": os.environ["SF_CLIENT_SECRET"],
    }


def report(token_status: int, token: dict, rest_status: int | None, versions: list | None) -> None:
    print(json.dumps({
        "token_status": token_status,
        "refresh_token": token.get("refresh_token"),
        "rest_status": rest_status,
        "api_versions": len(versions) if isinstance(versions, list) else None,
    }))
