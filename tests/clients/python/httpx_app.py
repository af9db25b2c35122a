"""httpx, sync: no proxy or trust code; trust_env (the default) reads HTTPS_PROXY and SSL_CERT_FILE."""

import httpx
from common import refresh_form, report, token_url

with httpx.Client(timeout=15) as http:
    t = http.post(token_url(), data=refresh_form())
    token = t.json() if t.is_success else {}
    r = (http.get(token["instance_url"] + "/services/data/",
                  headers={"Authorization": f"Bearer {token['access_token']}"}) if t.is_success else None)
report(t.status_code, token, r.status_code if r is not None else None, r.json() if r is not None else None)
