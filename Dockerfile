# lightning_dpmot image. Users (CUDA): `docker build -t dpmot .` then
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs -v /data:/data dpmot fit --config configs/edm/cifar10_ddpmpp.yaml
# Offline / CPU (CI): `bash docker/build_cpu_image.sh` passes a local Debian base, a wheelhouse and --network none.
# On SLURM run the image through pyxis or Apptainer, not `srun docker run` (experiments/cluster/README.md says why).
#
# Build arguments:
#   BASE            base image; the default is a pinned official CUDA PyTorch image whose torch is kept as is
#   EXTRAS          optional dependency groups to install (GPU default: image,text; the CPU build: text)
#   PIP_ARGS        extra pip arguments (the CPU build: --no-index, so only the wheelhouse is used)
#   BAKE_INCEPTION  1: download the FID Inception weights at build time (SHA-256 checked) for offline nodes
ARG BASE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

# ---- stage 1: a virtual environment with the package and its dependencies ----------------------------------------
FROM ${BASE} AS build
ARG EXTRAS=image,text
ARG PIP_ARGS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The wheelhouse, when the build context has one (docker/build_cpu_image.sh puts it there); pyproject.toml makes the
# COPY valid without one. It stays in this stage only.
COPY pyproject.toml wheelhous[e] /wheelhouse/
COPY pyproject.toml README.md /src/
COPY lightning_dpmot /src/lightning_dpmot
# --system-site-packages: the base image's torch (CUDA build) is used, never replaced: pip is constrained to its version.
RUN python3 -m venv --system-site-packages /opt/dpmot && \
    (python3 -c "import torch; print(f'torch=={torch.__version__}')" 2>/dev/null || true) > /tmp/constraints.txt && \
    echo "pinned by the base image: $(cat /tmp/constraints.txt)" && \
    /opt/dpmot/bin/pip install --find-links /wheelhouse ${PIP_ARGS} -c /tmp/constraints.txt "/src[${EXTRAS}]" && \
    /opt/dpmot/bin/python -c "import torch, lightning, lightning_dpmot; print('torch', torch.__version__)"

# ---- stage 2: the runtime image ---------------------------------------------------------------------------------
FROM ${BASE}
ARG BAKE_INCEPTION=0
ENV PATH=/opt/dpmot/bin:${PATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TORCH_HOME=/opt/torch HF_HOME=/opt/hf WANDB_DIR=/workspace/runs
COPY --from=build /opt/dpmot /opt/dpmot
WORKDIR /workspace
COPY configs configs
COPY experiments experiments
COPY benchmarks benchmarks
RUN mkdir -p /workspace/runs /opt/torch /opt/hf && \
    if [ "${BAKE_INCEPTION}" = "1" ]; then \
        python3 -c "from lightning_dpmot.metrics.inception import download_inception_weights as d; print(d())"; \
    fi && \
    (getent passwd 1000 >/dev/null || useradd --create-home --uid 1000 dpmot) && \
    chown -R 1000:1000 /workspace /opt/torch /opt/hf && \
    dpmot --help >/dev/null
USER 1000
ENTRYPOINT ["dpmot"]
CMD ["--help"]
