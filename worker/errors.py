"""Worker-side failures that end one job with a typed error."""

from __future__ import annotations

from producer.errors import ErrorCode
from producer.records import JobError


class JobFailure(Exception):
    """Ends one job with ``error``; other jobs are unaffected."""

    def __init__(self, code: ErrorCode, message: str, parameter: str | None = None):
        super().__init__(message)
        self.error = JobError(code=code, message=message, parameter=parameter)
