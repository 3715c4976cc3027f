"""Every gateway error in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the
status OpenAI's SDKs map to their exceptions: never a 500 with a traceback for what a caller sent."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from producer.batches import BatchError
from producer.connection import describe_error, is_out_of_memory
from producer.errors import ErrorCode, InvalidRequestError, JobNotFoundError, NotReplicatedError
from producer.records import JobError

log = logging.getLogger("belle.gateway")

RETRY_AFTER_S = 5

# A job that ended without a result, as an HTTP status (the record keeps the detail).
JOB_ERROR_STATUS = {
    ErrorCode.INVALID_REQUEST: 400, ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400, ErrorCode.OUT_OF_MEMORY: 500, ErrorCode.GENERATION_ERROR: 500,
    ErrorCode.WORKER_LOST: 500, ErrorCode.CANCELLED: 409, ErrorCode.EXPIRED: 504,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def unavailable(message: str, code: str = "unavailable") -> ApiError:
    return ApiError(503, message, type="service_unavailable", code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


def job_error(job_id: str, error: JobError | None, headers: dict[str, str] | None = None) -> ApiError:
    """A job that ended without a result."""
    if error is None:
        return ApiError(500, f"job {job_id} ended without a result", type="server_error", headers=headers)
    status = JOB_ERROR_STATUS.get(error.code, 500)
    return ApiError(status, error.message, type="invalid_request_error" if status < 500 else "server_error", param=error.parameter,
                    code=error.code.value, headers=headers)


def install(app: FastAPI, redis_url: str) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(InvalidRequestError)
    async def invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return ApiError(400, str(exc), param=exc.parameter, code=exc.code.value).response()

    @app.exception_handler(JobNotFoundError)
    async def not_found(request: Request, exc: JobNotFoundError) -> JSONResponse:
        return ApiError(404, str(exc), code="not_found").response()

    @app.exception_handler(BatchError)
    async def batch_error(request: Request, exc: BatchError) -> JSONResponse:
        return ApiError(404 if "no batch" in str(exc) else 400, str(exc), code="batch_error").response()

    @app.exception_handler(redis.RedisError)
    async def redis_error(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        code = "redis_full" if is_out_of_memory(exc) else "not_replicated" if isinstance(exc, NotReplicatedError) else "redis_unavailable"
        return unavailable(describe_error(exc, redis_url), code).response()

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return ApiError(400, f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param, code="invalid_request").response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, str(exc.detail), type=kind, code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code),
                        headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return ApiError(500, f"the gateway failed ({type(exc).__name__}); this is a bug in belle-queue", type="server_error").response()
