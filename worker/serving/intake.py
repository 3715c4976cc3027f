"""What a worker accepts off a queue: exactly the messages the producer writes (producer/enqueue.py).

Anything can arrive on a queue. Two checks, each a pure function of what arrived:
  - ``envelope_problem``: is it a kombu Redis envelope at all (made before the message is recorded as
    unacknowledged: what fails here is dropped at once, and is never redelivered);
  - ``task_problem``: is it a ``belle.generate`` task message as the producer writes it (protocol 2,
    JSON, no ETA, expiry, time limit or callbacks: things Celery would act on, holding a message for
    ever or sending tasks of the sender's choosing).
A message either check refuses is rejected unread; if it names one of our jobs, that job fails
``invalid_request`` unless it has a record (worker/serving/handler.py, ``JobHandler.unreadable``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from producer import keys

# Celery headers the producer always leaves empty, and what Celery would do with them.
_EMPTY_HEADERS = {
    "eta": "hold the message until then",
    "expires": "revoke the job once it passes",
    "countdown": "hold the message",
    "group": "join a group result",
    "chord": "run a chord callback",
}
_EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")  # the body's third part: tasks Celery would send after this one
MAX_DELIVERY_TAG_CHARS = 128


def envelope_problem(raw: Any) -> str | None:
    """Why ``raw`` (a queue entry decoded from JSON) is not a kombu Redis message envelope, or None."""
    if not isinstance(raw, Mapping):
        return f"an envelope is a JSON object, got {type(raw).__name__}"
    properties = raw.get("properties")
    if not isinstance(properties, Mapping):
        return "its properties are not an object"
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not 0 < len(tag) <= MAX_DELIVERY_TAG_CHARS:
        return f"its delivery_tag is not a string of 1 to {MAX_DELIVERY_TAG_CHARS} characters"
    info = properties.get("delivery_info")
    if not isinstance(info, Mapping) or not isinstance(info.get("exchange"), str) or not isinstance(info.get("routing_key"), str):
        return "its delivery_info does not name an exchange and a routing key"
    priority = properties.get("priority")
    if priority is not None and (type(priority) is not int or not 0 <= priority <= 255):
        return "its priority is not an integer from 0 to 255"
    if properties.get("body_encoding") not in (None, "base64"):
        return "its body_encoding is not base64"
    if not isinstance(raw.get("body"), str | None):
        return "its body is not a string"
    if not isinstance(raw.get("headers"), Mapping | None):
        return "its headers are not an object"
    for name in ("content-type", "content-encoding"):
        if not isinstance(raw.get(name), str | None):
            return f"its {name} is not a string"
    return None


def named_job(headers: Any) -> str | None:
    """The job a message's headers name, if they name one of ours with a well-formed id."""
    if not isinstance(headers, Mapping) or headers.get("task") != keys.TASK_GENERATE:
        return None
    job_id = headers.get("id")
    return job_id if isinstance(job_id, str) and keys.ID.match(job_id) else None


def task_problem(headers: Any, content_type: Any, content_encoding: Any, decode) -> str | None:
    """Why a message is not a ``belle.generate`` task message as the producer writes it, or None.
    ``decode()`` returns its body decoded (JSON only: the content type is checked first)."""
    if not isinstance(headers, Mapping):
        return "it has no task headers (only Celery task protocol 2 is served)"
    task = headers.get("task")
    if task != keys.TASK_GENERATE:
        return f"task {str(task)[:100]!r} is not served here (only {keys.TASK_GENERATE})"
    if named_job(headers) is None:
        return "its id header is not a job id (1 to 64 letters, digits, '_' or '-')"
    for name, effect in _EMPTY_HEADERS.items():
        if headers.get(name) is not None:
            return f"its {name} header is set (Celery would {effect}); a job message never sets it"
    if headers.get("timelimit") not in (None, [None, None], (None, None)):
        return "its timelimit header is set; a job message never sets it (use the request's deadline)"
    if content_type != "application/json" or content_encoding != "utf-8":
        return f"its content is {str(content_type)[:60]!r} in {str(content_encoding)[:30]!r}; messages must be JSON (application/json, utf-8)"
    try:
        body = decode()
    except Exception as exc:  # whatever the decoder raises for bytes that are not JSON
        return f"its body could not be read ({type(exc).__name__}: {str(exc)[:200]}); messages must be JSON (UTF-8)"
    if not (isinstance(body, list | tuple) and len(body) == 3):
        return f"its body is not [args, kwargs, embed] (got {type(body).__name__}{f' of {len(body)}' if isinstance(body, list | tuple) else ''})"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, Mapping) or not isinstance(embed, Mapping | None):
        return "its body is not [args (a list), kwargs (an object), embed (an object)]"
    if embed and any(embed.get(name) for name in _EMBED_KEYS):
        return "it carries callbacks, errbacks, a chain or a chord (tasks Celery would send after it); a job message never does"
    if kwargs.get("job_id") != headers.get("id"):
        return "its kwargs' job_id differs from its id header"
    return None
