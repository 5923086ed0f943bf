# syntax=docker/dockerfile:1.7
#
# One image for every Flotilla role, the role chosen by the command
# (k8s/ runs each Deployment with its own args):
#
#   flotilla serve {controller|router|batcher|preprocess} --config FILE --port N --metrics-port M
#
#   docker build -t flotilla:0.1.0 .                                  # the default target
#   docker build --target triton-cpu -t flotilla-triton-cpu:0.1.0 .  # Triton on CPU (the cpu overlay)
#
# Runtime dependencies only: the wheels are built in a throwaway stage and
# installed from a bind mount, so no build tool, source tree or wheel file
# stays in a layer. Non-root (65532). Pin the base by digest at release time
# (`docker buildx imagetools inspect python:3.11.11-slim-bookworm`).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY flotilla flotilla
COPY services services
COPY clients clients
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
# GRPC_EXPERIMENTS: gRPC's I/O on its grpc.aio poller thread, not handed to EventEngine's
# threads; GLIBC_TUNABLES: malloc keeps the heap it grew rather than page-faulting it in again
# after every burst (flotilla/common/runtime_env.py says why and what each measured).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRPC_EXPERIMENTS=-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints \
    GLIBC_TUNABLES=glibc.malloc.trim_threshold=67108864:glibc.malloc.mmap_threshold=33554432
# Into the interpreter's own site-packages (no venv): Triton's Python-backend
# stub embeds this libpython and imports numpy and onnxruntime from there.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels flotilla
USER 65532:65532
ENTRYPOINT ["flotilla"]

# Triton for CPU clusters: the tritonserver binary of the nvidia-pytriton
# wheel (what the local stack runs) with its Python backend laid out where the
# official image keeps backends, so the StatefulSet's arguments are the same
# for both images. The generic ONNX wrapper runs in this image's Python.
FROM runtime AS triton-cpu
USER root
ARG PYTRITON_VERSION=0.7.0
ARG SITE=/usr/local/lib/python3.11/site-packages
RUN pip install --no-cache-dir "nvidia-pytriton==${PYTRITON_VERSION}" "numpy>=1.26,<2" "onnxruntime>=1.18" \
 && mkdir -p /opt/tritonserver/backends/python \
 && cp ${SITE}/pytriton/tritonserver/backends/python/libtriton_python.so \
       ${SITE}/pytriton/tritonserver/backends/python/triton_python_backend_utils.py \
       ${SITE}/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub \
       /opt/tritonserver/backends/python/ \
 && ln -s ${SITE}/pytriton/tritonserver/bin/tritonserver /usr/local/bin/tritonserver
# tritonserver runs its own gRPC build and allocators on their defaults: the Flotilla services'
# GRPC_EXPERIMENTS and GLIBC_TUNABLES are not for it.
ENV LD_LIBRARY_PATH=${SITE}/nvidia_pytriton.libs \
    GRPC_EXPERIMENTS= \
    GLIBC_TUNABLES=
USER 65532:65532
ENTRYPOINT []
CMD ["tritonserver", "--help"]

# The default target: the Flotilla services.
FROM runtime AS flotilla
