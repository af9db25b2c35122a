// Node's built-in fetch on Node 20 (and 22 before 22.21): it ignores HTTPS_PROXY, so the app sets
// undici's EnvHttpProxyAgent as the global dispatcher once, at start.
import { EnvHttpProxyAgent, setGlobalDispatcher } from 'undici';
import { refreshAndCall } from './common.mjs';

setGlobalDispatcher(new EnvHttpProxyAgent());
await refreshAndCall(globalThis.fetch);
