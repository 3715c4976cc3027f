"""belle-queue's public contract and client: request schema, errors, records, and the job clients.

Importable without torch or transformers. Names are resolved on first use, so that importing the
package (and starting the `belle-queue` command) stays fast.
"""

from importlib import import_module

_EXPORTS = {
    "AsyncJobClient": "producer.aio",
    "BatchCancellation": "producer.batches",
    "JobClient": "producer.client",
    "BelleError": "producer.errors",
    "ErrorCode": "producer.errors",
    "InvalidRequestError": "producer.errors",
    "JobNotFoundError": "producer.errors",
    "JobTimeoutError": "producer.errors",
    "FinishReason": "producer.records",
    "JobError": "producer.records",
    "JobRecord": "producer.records",
    "JobResult": "producer.records",
    "JobState": "producer.records",
    "SequenceResult": "producer.records",
    "GenerationRequest": "producer.schemas",
    "Message": "producer.schemas",
    "parse_request": "producer.schemas",
    "Settings": "producer.settings",
    "get_settings": "producer.settings",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'producer' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
