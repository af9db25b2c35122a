"""aiohttp: the one line of code it needs is trust_env=True (it ignores HTTPS_PROXY otherwise);
its default SSL context reads SSL_CERT_FILE."""

import asyncio

import aiohttp
from common import refresh_form, report, token_url


async def main() -> None:
    async with aiohttp.ClientSession(trust_env=True, timeout=aiohttp.ClientTimeout(total=15)) as http:
        async with http.post(token_url(), data=refresh_form()) as t:
            token = await t.json() if t.ok else {}
            token_status = t.status
        rest_status = versions = None
        if token:
            async with http.get(token["instance_url"] + "/services/data/",
                                headers={"Authorization": f"Bearer {token['access_token']}"}) as r:
                rest_status, versions = r.status, await r.json()
    report(token_status, token, rest_status, versions)


asyncio.run(main())
