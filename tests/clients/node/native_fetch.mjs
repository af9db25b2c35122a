// Node's built-in fetch with no code at all: takes HTTPS_PROXY only with NODE_USE_ENV_PROXY=1 on
// Node 22.21+ / 24+. (On older Node it goes direct: tests/e2e/test_clients.py shows that.)
import { refreshAndCall } from './common.mjs';

await refreshAndCall(globalThis.fetch);
