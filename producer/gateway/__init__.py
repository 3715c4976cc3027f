"""The HTTP gateway (``belle-queue gateway``): OpenAI's API, the native job API, Batch files and webhooks,
over Redis through the client. Needs the ``gateway`` extra (FastAPI, uvicorn, sse-starlette)."""
