"""belle-queue's public contract and client: request schema, errors, records, and the job clients.

Importable without torch or transformers.
"""

from producer.errors import (
    BelleError,
    ConnectionProblem,
    ErrorCode,
    InvalidRequestError,
    JobNotFoundError,
    JobTimeoutError,
)
from producer.records import FinishReason, JobError, JobRecord, JobResult, JobState, SequenceResult
from producer.schemas import GenerationRequest, Message, parse_request
from producer.settings import Settings, get_settings

__all__ = [
    "AsyncJobClient",
    "BelleError",
    "ConnectionProblem",
    "ErrorCode",
    "FinishReason",
    "GenerationRequest",
    "InvalidRequestError",
    "JobClient",
    "JobError",
    "JobNotFoundError",
    "JobRecord",
    "JobResult",
    "JobState",
    "JobTimeoutError",
    "Message",
    "SequenceResult",
    "Settings",
    "get_settings",
    "parse_request",
]


def __getattr__(name: str):
    # The clients pull in redis and celery; keep `import producer` itself light.
    if name == "JobClient":
        from producer.client import JobClient

        return JobClient
    if name == "AsyncJobClient":
        from producer.aio import AsyncJobClient

        return AsyncJobClient
    raise AttributeError(name)
