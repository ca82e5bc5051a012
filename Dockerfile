# lightning_dpmot on a CUDA machine: `docker build -t dpmot .` then
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs -v /data:/data dpmot fit --config configs/edm/cifar10_ddpmpp.yaml
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 \
    TORCH_HOME=/opt/torch WANDB_DIR=/workspace/runs HF_HOME=/opt/hf
WORKDIR /workspace

# Dependencies first (layer cache); torch comes from the base image and must not be replaced.
COPY pyproject.toml README.md ./
COPY lightning_dpmot/__init__.py lightning_dpmot/__init__.py
RUN pip install -e . && python -c "import torch, lightning, lightning_dpmot; print(torch.__version__)"

COPY lightning_dpmot lightning_dpmot
COPY configs configs
COPY experiments experiments
COPY benchmarks benchmarks

RUN useradd --create-home --uid 1000 dpmot && mkdir -p /workspace/runs /opt/torch /opt/hf && \
    chown -R dpmot /workspace /opt/torch /opt/hf
USER dpmot

ENTRYPOINT ["dpmot"]
CMD ["--help"]
