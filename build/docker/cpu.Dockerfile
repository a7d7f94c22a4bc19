# x86-64 CPU image: vila-edge on ONNX Runtime (int4 AWQ LLM decoder, fp32 / int8 vision tower), no GPU.
#
#   make image-cpu        # = docker build -f build/docker/cpu.Dockerfile -t vila-edge:cpu .  (repository root)
#
# Serve engines built anywhere (`vila-edge build CKPT -o engines/x` on a laptop, or in this image with EXTRAS below):
#   docker run --rm -p 8000:8000 -v "$PWD/engines:/engines" vila-edge:cpu serve /engines/x --host 0.0.0.0 --api-key KEY
# Hub ids are cached in the /cache volume (HF_HOME); pass HF_TOKEN for gated models, HF_HUB_OFFLINE=1 for none:
#   docker run --rm -v hf:/cache -v "$PWD/engines:/engines" vila-edge:cpu info Efficient-Large-Model/NVILA-Lite-2B
#
# Every Python package version comes from requirements/dev.lock (pip constraints: the versions CI tested; the lock
# is resolved for CPython 3.11 on linux x86-64, hence this base). EXTRAS=serve,export adds torch + transformers so
# the image can build engines too; point pip at PyTorch's CPU wheel index for that, or torch arrives as the
# multi-GB CUDA build: --build-arg EXTRAS=serve,export --build-arg PIP_EXTRA_INDEX_URL=<PyTorch CPU wheel index>
FROM python:3.11-slim-bookworm

ARG EXTRAS=serve
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    VILA_EDGE_PROFILES=/opt/vila-edge/build/profiles

WORKDIR /opt/vila-edge
COPY requirements/dev.lock requirements/dev.lock
COPY pyproject.toml README.md ./
COPY vila_edge vila_edge
COPY build/profiles build/profiles
RUN pip install -c requirements/dev.lock ".[${EXTRAS}]" \
    && vila-edge --help >/dev/null

# Not root: engines and the hub cache are mounted volumes.
RUN useradd --create-home --uid 1000 vila \
    && mkdir -p /cache /engines \
    && chown vila:vila /cache /engines
USER 1000:1000
WORKDIR /home/vila
VOLUME ["/cache"]
EXPOSE 8000
ENTRYPOINT ["vila-edge"]
CMD ["--help"]
