# syntax=docker/dockerfile:1
# The serving image: the xaiserve wheel with its runtime dependencies only (OpenVINO, NumPy,
# OpenCV headless, gRPC); no torch. It serves a model repository mounted at /models.
#   docker build -f deploy/runtime.Dockerfile -t xaiserve:0.1.0 .
#   docker run -p 9000:9000 -p 8000:8000 -p 9090:9090 -v "$PWD/models:/models:ro" xaiserve:0.1.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The version in pyproject.toml (tests/test_deploy.py keeps the two equal).
ARG XAISERVE_VERSION=0.1.0

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY export ./export
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG XAISERVE_VERSION
LABEL org.opencontainers.image.title="xaiserve" \
      org.opencontainers.image.description="OpenVINO image classifiers served with their explanations (KServe v2 over gRPC and REST)"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XAISERVE_REPOSITORY=/models \
    XAISERVE_PORT=9000 \
    XAISERVE_METRICS_PORT=9090 \
    XAISERVE_REST_PORT=8000
RUN groupadd --system --gid 10001 xaiserve \
    && useradd --system --uid 10001 --gid xaiserve --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin xaiserve \
    && mkdir /models
COPY --from=wheel /wheels /tmp/wheels
# the wheel by its path: a name and version alone could be taken from an index instead
RUN pip install --no-cache-dir "/tmp/wheels/xaiserve-${XAISERVE_VERSION}-py3-none-any.whl" \
    && rm -rf /tmp/wheels
COPY --chmod=0755 deploy/entrypoint.sh /usr/local/bin/xaiserve-entrypoint
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 9000 9090
VOLUME ["/models"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["xaiserve-entrypoint", "health"]
ENTRYPOINT ["xaiserve-entrypoint"]
