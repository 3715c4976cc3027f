"""Celery and Redis: the app and its hardened transport, what happens to one delivered message, cancellation,
messages in hand, chunk publishing, the sweeper, the worker's announcement, metrics and process start-up.
Nothing here imports torch at module level."""
