# The rate-limiting service: `ratelimit serve`, configured like Limitador (LIMITS_FILE, HTTP_API_PORT,
# ENVOY_RLS_PORT, RATE_LIMIT_HEADERS, ... or the same command line), HTTP on 8080, gRPC on 8081.
#
#   docker build -t ratelimit .
#   docker run -p 8080:8080 -p 8081:8081 -v $PWD/examples/tiers.yaml:/limits/limits.yaml \
#     -e LIMITS_FILE=/limits/limits.yaml ratelimit
#   docker run ... ratelimit --maas /crs          # arguments go after `ratelimit serve`
# The limitador-operator runs it as Limitador (`command: [limitador-server]`, see docs/kuadrant.md).
# Runtime dependencies only: the `render` extra (matplotlib, for dashboards.render) is not installed.
FROM python:3.11-slim

# Only what the wheel is built from (see .dockerignore); default_limits.yaml links to examples/tiers.yaml.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ratelimit ratelimit
COPY exporter exporter
COPY dashboards dashboards
COPY examples/tiers.yaml examples/tiers.yaml
COPY deploy/install.sh deploy/install.sh
RUN PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 sh deploy/install.sh /src /opt/ratelimit \
    && rm -rf /src \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin ratelimit
WORKDIR /

# numba caches compiled kernels beside the code by default, which a non-root user (and a read-only
# root file system) cannot write: /tmp is writable in both (an emptyDir in deploy/base/deployment.yaml);
# where it is not either, the service falls back to another temporary directory instead of failing.
# Any UID works (OpenShift assigns one per namespace): nothing is written outside /tmp, HOME included.
ENV PATH=/opt/ratelimit/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    NUMBA_CACHE_DIR=/tmp/numba-cache
USER 10001
EXPOSE 8080 8081

# /status answers once the limits are loaded; HTTP_API_PORT moves it, as it moves the server.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/status' % os.environ.get('HTTP_API_PORT', '8080'), timeout=2)"]

ENTRYPOINT ["ratelimit", "serve"]
