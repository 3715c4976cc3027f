"""Exceptions raised to users of the client, and the typed error codes stored in failed jobs."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"  # the request broke a rule; the message names parameter and fix
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # prompt leaves no room to generate in the context window
    OUT_OF_MEMORY = "out_of_memory"  # the job ran out of device memory even alone
    GENERATION_ERROR = "generation_error"  # the model raised something else while generating
    WORKER_LOST = "worker_lost"  # the job was delivered max_attempts times and never finished
    CANCELLED = "cancelled"  # cancelled before it started (a job cancelled while running keeps its partial result)
    EXPIRED = "expired"  # its deadline passed before it started


class BelleError(Exception):
    """Base class of every error this package raises on purpose."""


@dataclass(frozen=True)
class ParameterProblem:
    parameter: str
    value: Any
    message: str


class InvalidRequestError(BelleError, ValueError):
    """A request broke a validation rule. ``parameter`` and ``value`` name the first problem;
    ``problems`` lists all of them."""

    code = ErrorCode.INVALID_REQUEST

    def __init__(self, problems: list[ParameterProblem]):
        if not problems:
            raise ValueError("InvalidRequestError needs at least one problem")
        self.problems = problems
        self.parameter = problems[0].parameter
        self.value = problems[0].value
        super().__init__("; ".join(p.message for p in problems))

    @classmethod
    def single(cls, parameter: str, value: Any, message: str) -> InvalidRequestError:
        return cls([ParameterProblem(parameter, value, message)])


class JobNotFoundError(BelleError, KeyError):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job {job_id!r}: it never existed here or its record expired (BELLE_RESULT_TTL_S)")

    def __str__(self) -> str:
        return str(self.args[0])


class JobTimeoutError(BelleError, TimeoutError):
    def __init__(self, job_id: str, timeout: float, state: str):
        self.job_id = job_id
        self.state = state
        super().__init__(f"job {job_id} is still {state} after {timeout:g} s")



class NotReplicatedError(BelleError, redis.RedisError):
    """A write was made on the primary, but fewer replicas than BELLE_WAIT_REPLICAS confirmed it in time: it
    would be lost if the primary failed now. For a submit, the job is queued (it runs) but not durable yet."""

    def __init__(self, what: str, confirmed: int, wanted: int, timeout_ms: int, job_id: str | None = None, replies: list | None = None):
        self.job_id = job_id
        self.replies = replies or []  # what the commands whose confirmation was awaited answered
        self.confirmed = confirmed
        self.wanted = wanted
        again = (f"; it is queued and runs, but would be lost if the primary failed now: check it with `status {job_id}` "
                 "(or submit again with the same idempotency_key, which does not enqueue it twice)" if job_id else "")
        super().__init__(f"{what}: {confirmed} of the {wanted} replicas asked for (BELLE_WAIT_REPLICAS) confirmed it within "
                         f"{timeout_ms} ms (BELLE_WAIT_TIMEOUT_MS){again}; bring a replica back or lower BELLE_WAIT_REPLICAS")

    def __str__(self) -> str:
        return str(self.args[0])


class RedisFullError(BelleError, redis.exceptions.OutOfMemoryError):
    """Redis refuses writes: its memory reached ``maxmemory`` (with the ``noeviction`` policy, which
    belle-queue relies on: it never drops a record or a message to make room). Nothing was written."""

    def __init__(self, where: str, detail: str = ""):
        self.where = where
        super().__init__(f"redis at {where} refuses writes: it is out of memory (maxmemory reached{'; ' + detail if detail else ''}); "
                         "free memory (finished jobs' records expire after BELLE_RESULT_TTL_S; delete what you no longer need) "
                         "or raise maxmemory (CONFIG SET maxmemory ...), then try again")

    def __str__(self) -> str:
        return str(self.args[0])
