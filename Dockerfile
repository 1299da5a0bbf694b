# syntax=docker/dockerfile:1
#
# Image of the Deep Anomaly Monitor service.
#   docker build -t deep-anomaly-monitor:0.1.0 .
#
# The builder stage turns the source into a wheel. The runtime stage installs the
# CPU build of torch from PyTorch's CPU wheel index, then the wheel and its other
# dependencies from PyPI, and runs as an unprivileged user. tests/test_image.py
# repeats these install steps in a fresh venv, because no image can be built in CI.

# Debian 12 with CPython 3.11, the Python the project is tested on. Pin it by digest
# (python:3.11-slim-bookworm@sha256:...) in a release pipeline.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY monitor ./monitor
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
# torch's default Linux wheel on PyPI is the CUDA build with about 3 GB of NVIDIA
# libraries; the CPU index serves the same version without them.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=builder /wheels /tmp/wheels
# pip is removed last: the running service installs nothing, and no compiler is in
# the slim base image to begin with.
RUN python -m pip install /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && python -m pip uninstall --yes pip

# A fixed numeric user, so Kubernetes can check runAsNonRoot without a name lookup.
# The chart's podSecurityContext uses the same ids.
RUN groupadd --system --gid 10001 monitor \
    && useradd --system --uid 10001 --gid monitor --home-dir /var/lib/anomaly-monitor \
       --no-create-home --shell /usr/sbin/nologin monitor \
    && install --directory --owner monitor --group monitor /var/lib/anomaly-monitor
USER 10001:10001
WORKDIR /var/lib/anomaly-monitor

# `docker run -v $PWD/config.yaml:/etc/anomaly-monitor/config.yaml:ro IMAGE` starts the
# service; other subcommands replace `run`, e.g. `IMAGE check-config`.
ENV ANOMALY_MONITOR_CONFIG=/etc/anomaly-monitor/config.yaml
EXPOSE 9464
ENTRYPOINT ["anomaly-monitor"]
CMD ["run"]
