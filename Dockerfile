# syntax=docker/dockerfile:1
# mcp-bastion: one image for every role (proxy, app service, all-in-one); the configuration file
# decides which services run.  See docs/deploy.md.
#
#   docker build -t mcp-bastion .
#   docker run --rm -v bastion-data:/var/lib/bastion -v $PWD/bastion.yaml:/etc/bastion/bastion.yaml:ro \
#     -p 3080:3080 mcp-bastion
#
# Nothing secret is baked in: the configuration file is mounted at run time, and the PostgreSQL
# password comes from the environment (PGPASSWORD) or a mounted file (PGPASSFILE).

ARG PYTHON_VERSION=3.12

# ---------------------------------------------------------------- build: the wheel, then a venv
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv /opt/bastion \
 && /opt/bastion/bin/pip install /dist/mcp_bastion-*.whl

# ---------------------------------------------------------------- runtime: the venv, a non-root user
FROM python:${PYTHON_VERSION}-slim AS runtime
LABEL org.opencontainers.image.title="mcp-bastion" \
      org.opencontainers.image.description="An identity-aware access gateway for MCP servers" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 bastion \
 && useradd --system --uid 10001 --gid bastion --home-dir /var/lib/bastion --shell /usr/sbin/nologin bastion \
 && install -d -o bastion -g bastion -m 0700 /var/lib/bastion \
 && install -d -m 0755 /etc/bastion
COPY --from=build /opt/bastion /opt/bastion
ENV PATH=/opt/bastion/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BASTION_CONFIG=/etc/bastion/bastion.yaml \
    BASTION_HEALTH_URL=http://127.0.0.1:3434/healthz
# numeric, so that runtimes (Kubernetes runAsNonRoot) can tell it is not root
USER 10001:10001
WORKDIR /var/lib/bastion
# data_dir: keys, host certificate, SQLite files, the audit spool.
VOLUME ["/var/lib/bastion"]
# 3080 HTTPS (clients), 3024 reverse tunnel (app services), 3434 diagnostics (plain HTTP, keep private)
EXPOSE 3080 3024 3434
# The diagnostics listener's liveness: the configuration must set bastion.diag_addr
# (127.0.0.1:3434, or 0.0.0.0:3434 where an orchestrator probes from outside); override
# BASTION_HEALTH_URL for another address.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['BASTION_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["bastion"]
CMD ["start"]
