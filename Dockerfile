# syntax=docker/dockerfile:1
# The meshai image the k3s manifests run (k3s/, image ghcr.io/meshai/meshai:<version of pyproject.toml>):
#   docker build -t ghcr.io/meshai/meshai:0.1.0 .
# Stage 1 builds the project's own wheel from this tree; stage 2 installs that wheel (no dev extras)
# into a slim Python and runs it as an unprivileged user. onnxruntime is the CPU build: a gpu-class
# node runs (and says "emulated") until the image carries onnxruntime-gpu and CUDA.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY meshai/ meshai/
COPY nodes/ nodes/
COPY scheduler/ scheduler/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install --no-cache-dir /dist/meshai-*.whl \
 && groupadd --system --gid 10001 meshai \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin meshai
# numeric, so that the kubelet can check runAsNonRoot without reading /etc/passwd
USER 10001:10001
ENTRYPOINT ["meshai"]
CMD ["--help"]
