# egress-sidecar: forward proxy that sends Salesforce OAuth token calls out through a
# QuotaGuard Static proxy pair (allowlisted static IPs). Build from the repository root:
#   docker build -t egress-sidecar:0.1.0 .
#
# Tested without a Docker engine by tests/deploy/test_dockerfile.py: hadolint must be clean, the
# HEALTHCHECK command must tell a healthy admin port from a broken one, and the COPY + pip
# install steps below are replayed in a fresh virtualenv (a missing COPY fails that test).

# Pinned by tag; pin by digest as well (python:3.12-slim@sha256:...) in your own registry mirror.
FROM python:3.12-slim

# No .pyc files on the read-only root filesystem; logs unbuffered; pip quiet about itself.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Unprivileged user with a fixed numeric uid/gid. USER below is numeric on purpose: Kubernetes
# can only verify runAsNonRoot when the image's user is a number.
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /var/lib/egress-sidecar --shell /usr/sbin/nologin sidecar \
    && mkdir -p /var/lib/egress-sidecar \
    && chown 10001:10001 /var/lib/egress-sidecar

WORKDIR /opt/egress-sidecar

# Dependencies first, from the lock alone (make lock writes it: every package pinned, every file
# hash-checked, the build backend included). This layer is rebuilt only when requirements.lock
# changes, not on every code change; pyproject.toml is not copied yet because this step does not read it.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock

# Then the project: only what its build needs (see .dockerignore), installed without dependencies
# (all are in the layer above) and without build isolation (setuptools comes from the lock, so
# nothing unpinned is fetched). `pip check` fails the build when pyproject.toml needs a package the
# lock lacks: run `make lock`. README.md* is a glob so the build does not break while the README is
# absent; pyproject.toml names it as the long description.
COPY pyproject.toml README.md* ./
COPY sidecar/ sidecar/
COPY addons/ addons/
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && pip check

# The sidecar's settings (all SIDECAR_* variables, see sidecar/config.py). Only the image-specific
# ones are set here; everything else keeps the application default.
# - SIDECAR_CONFDIR: CA key and state. A volume, so it survives container restarts. The files apps
#   need to trust the sidecar (ca.pem, ca-bundle.pem: public roots + its CA) go to SIDECAR_TRUST_DIR,
#   by default this same directory; to hand them to another container, set SIDECAR_TRUST_DIR to a
#   separate volume and share only that one (never the confdir: it holds the CA's private key).
# - SIDECAR_LISTEN: the proxy stays on loopback. In a Kubernetes pod the app and the sidecar share
#   the network namespace, so the app reaches it at 127.0.0.1:3128 and nothing else can. Only when
#   other containers/hosts must use it (docker run -p, compose) set SIDECAR_LISTEN=0.0.0.0:3128,
#   and then also SIDECAR_PROXY_AUTH so it is not an open proxy.
# - SIDECAR_ADMIN_LISTEN: /metrics, /healthz, /readyz, /status, /ca.pem on all interfaces so the
#   kubelet probes and Prometheus reach it (it never proxies anything).
ENV SIDECAR_CONFDIR=/var/lib/egress-sidecar \
    SIDECAR_LISTEN=127.0.0.1:3128 \
    SIDECAR_ADMIN_LISTEN=0.0.0.0:9464

USER 10001:10001
VOLUME ["/var/lib/egress-sidecar"]

# 3128: proxy (loopback by default, see above). 9464: admin/metrics.
EXPOSE 3128 9464

# No curl in the slim image: probe /healthz with the interpreter. Follows SIDECAR_ADMIN_LISTEN
# (a wildcard host means "ask on loopback"); any error or non-2xx status exits 1 (unhealthy).
# ProxyHandler({}) ignores HTTP_PROXY/NO_PROXY, so a proxy set for the container is never used.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; h, _, p = os.environ.get('SIDECAR_ADMIN_LISTEN', '0.0.0.0:9464').rpartition(':'); h = h.strip('[]'); h = {'': '127.0.0.1', '0.0.0.0': '127.0.0.1', '::': '::1'}.get(h, h); h = f'[{h}]' if ':' in h else h; u.build_opener(u.ProxyHandler({})).open(f'http://{h}:{p}/healthz', timeout=4).close()"]

ENTRYPOINT ["egress-sidecar"]
CMD ["run"]
