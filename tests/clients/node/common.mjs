// What every Node client of the matrix shares: the refresh and the REST call with a fetch-like
// function, and the one-line JSON report. The test passes the Salesforce side in SF_* variables.
const env = process.env;

export const tokenUrl = env.SF_TOKEN_URL;
// A string body: every client sends it with a Content-Length (a stream would go chunked).
export const refreshBody = new URLSearchParams({
  grant_type: 'refresh_token',
  refresh_token: env.SF_REFRESH_TOKEN,
  client_id: env.SF_CLIENT_ID,
  client_secret: env.SF_CLIENT_SECRET,
}).toString();
export const formHeaders = { 'Content-Type': 'application/x-www-form-urlencoded' };

export function report(tokenStatus, token, restStatus, versions) {
  console.log(JSON.stringify({
    token_status: tokenStatus,
    refresh_token: token.refresh_token ?? null,
    rest_status: restStatus,
    api_versions: Array.isArray(versions) ? versions.length : null,
  }));
}

// The refresh, then GET /services/data/ on the instance, with `fetchFn` and `init` added to each call.
export async function refreshAndCall(fetchFn, init = {}) {
  const t = await fetchFn(tokenUrl, { ...init, method: 'POST', headers: formHeaders, body: refreshBody });
  const token = t.ok ? await t.json() : {};
  let restStatus = null;
  let versions = null;
  if (t.ok) {
    const r = await fetchFn(`${token.instance_url}/services/data/`,
      { ...init, headers: { Authorization: `Bearer ${token.access_token}` } });
    restStatus = r.status;
    versions = await r.json();
  }
  report(t.status, token, restStatus, versions);
}
