// undici's own fetch with an EnvHttpProxyAgent dispatcher, which reads HTTPS_PROXY/NO_PROXY.
import { EnvHttpProxyAgent, fetch } from 'undici';
import { refreshAndCall } from './common.mjs';

await refreshAndCall(fetch, { dispatcher: new EnvHttpProxyAgent() });
