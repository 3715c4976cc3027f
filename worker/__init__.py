"""belle-queue's worker: the Celery app, the resident model engine, and the worker-side commands."""
