#!/usr/bin/env bash
# What the client matrix (tests/e2e/test_clients.py) needs beyond the Python test extra: a JDK for the Java
# client (java runs SalesforceRefresh.java from source), Node and npm, and the Node clients' packages
# pinned by tests/clients/node/package-lock.json. Called by .ci/run; run it once on a dev machine too.
# Installs Debian packages only when missing (as root); idempotent.
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v java >/dev/null || need+=(default-jdk-headless)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "missing system packages: ${need[*]} (run as root or install them)" >&2
    exit 1
  fi
fi

echo "== node clients: npm ci in tests/clients/node (node $(node --version))"
(cd node && npm ci --no-audit --no-fund --loglevel=error)
