// node-fetch + https-proxy-agent: the app builds the agent from HTTPS_PROXY; Node's TLS adds
// NODE_EXTRA_CA_CERTS to its roots.
import fetch from 'node-fetch';
import { HttpsProxyAgent } from 'https-proxy-agent';
import { refreshAndCall } from './common.mjs';

await refreshAndCall(fetch, { agent: new HttpsProxyAgent(process.env.HTTPS_PROXY) });
