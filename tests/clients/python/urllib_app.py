"""urllib.request: no proxy or trust code; it reads HTTPS_PROXY and (through ssl) SSL_CERT_FILE."""

import json
import urllib.error
import urllib.parse
import urllib.request

from common import refresh_form, report, token_url

req = urllib.request.Request(token_url(), data=urllib.parse.urlencode(refresh_form()).encode())
try:
    with urllib.request.urlopen(req, timeout=15) as t:
        token_status, token = t.status, json.load(t)
except urllib.error.HTTPError as err:
    token_status, token = err.code, {}
rest_status = versions = None
if token:
    api = urllib.request.Request(token["instance_url"] + "/services/data/",
                                 headers={"Authorization": f"Bearer {token['access_token']}"})
    with urllib.request.urlopen(api, timeout=15) as r:
        rest_status, versions = r.status, json.load(r)
report(token_status, token, rest_status, versions)
