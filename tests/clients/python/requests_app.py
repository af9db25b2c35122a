"""Python requests: no proxy or trust code; HTTPS_PROXY and REQUESTS_CA_BUNDLE come from the environment."""

import requests
from common import refresh_form, report, token_url

with requests.Session() as http:
    t = http.post(token_url(), data=refresh_form(), timeout=15)
    token = t.json() if t.ok else {}
    r = (http.get(token["instance_url"] + "/services/data/", timeout=15,
                  headers={"Authorization": f"Bearer {token['access_token']}"}) if t.ok else None)
report(t.status_code, token, r.status_code if r is not None else None, r.json() if r is not None else None)
