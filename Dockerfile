# quotagate service image: `quotagate serve` on gRPC :50051 and HTTP :8080 (/healthz /readyz /metrics).
#   docker build -t quotagate .
# The config is mounted at /etc/quotagate/quotagate.yaml (see docker-compose.yml and deploy/README.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build needs; README.md* so the build works whether or not the README exists yet.
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY src ./src
# Runtime dependencies only (no [local] or [dev] extras: no Envoy, embedded servers or test tools).
RUN pip install . && rm -rf /src

RUN groupadd --system --gid 10001 quotagate \
    && useradd --system --uid 10001 --gid quotagate --home-dir /nonexistent --shell /usr/sbin/nologin quotagate
WORKDIR /
USER 10001:10001

ENV QUOTAGATE_CONFIG=/etc/quotagate/quotagate.yaml
# gRPC (Usage, Admin, health, reflection, and Envoy's services), what Envoy calls (50053: Check, ShouldRateLimit,
# ext_proc) and HTTP (/healthz /readyz /metrics /webhooks/stripe). Every gRPC caller needs its token, given at run
# time (never baked in): QUOTAGATE_ENVOY_TOKEN for Envoy, QUOTAGATE_USAGE_TOKEN for ReportUsage, QUOTAGATE_ADMIN_TOKEN.
EXPOSE 50051 50053 8080

# Liveness only: /readyz also needs PostgreSQL and Redis, which a restart would not fix.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

ENTRYPOINT ["quotagate"]
CMD ["serve"]
