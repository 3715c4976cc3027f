"""What Celery shows of a job (Flower, `celery events`): its task's state follows the job's, and a revoke
through Celery's remote control cancels the job as `belle-queue cancel` does. A real worker with task
events on, and a real event receiver."""

from __future__ import annotations

import threading
import time

import pytest
import yaml

from producer import keys
from producer.client import JobClient
from producer.enqueue import new_job_id, task_message
from producer.errors import ErrorCode
from producer.queueing import make_sender
from producer.records import FinishReason, JobState
from producer.settings import Settings
from tests.waiting import stays, wait_for

QUEUE = keys.QUEUE_INTERACTIVE
ENDS = {"task-succeeded", "task-failed", "task-revoked"}
# The tiny LLaMA rarely ends on its own: a job that decodes for seconds.
LONG = {"num_beams": 1, "max_new_tokens": 600, "min_new_tokens": 100}
SHORT = {"num_beams": 1, "max_new_tokens": 4}


class EventLog:
    """Celery's event stream of one broker, as Flower reads it, captured on a thread."""

    def __init__(self, app):
        self.app = app
        self.seen: list[dict] = []

    def __enter__(self) -> EventLog:
        self.connection = self.app.connection()
        self.receiver = self.app.events.Receiver(self.connection, handlers={"*": self.seen.append})
        self.thread = threading.Thread(target=lambda: self.receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True)
        self.thread.start()
        with self.app.connection() as probing, self.app.events.Dispatcher(probing) as probe:

            def bound() -> bool:
                probe.send("belle-probe")
                return any(e["type"] == "belle-probe" for e in self.seen)

            wait_for(bound, 30, "the receiver's queue is bound (an event sent now reaches it)")
        return self

    def __exit__(self, *exc) -> None:
        self.receiver.should_stop = True
        self.thread.join(10)
        self.connection.release()

    def of(self, job_id: str) -> list[dict]:
        return [e for e in list(self.seen) if e.get("uuid") == job_id]

    def types(self, job_id: str) -> list[str]:
        return [e["type"] for e in self.of(job_id)]

    def end(self, job_id: str, timeout: float = 60) -> dict:
        """The end event of the job's task (task-succeeded, -failed or -revoked), checked to be its only one."""
        event = wait_for(lambda: next((e for e in self.of(job_id) if e["type"] in ENDS), None), timeout,
                         lambda: f"an end event for job {job_id}; its events: {self.types(job_id)}")
        assert [t for t in self.types(job_id) if t in ENDS] == [event["type"]], self.types(job_id)
        return event


@pytest.fixture(scope="module")
def monitored(new_database, start_worker, tiny_llama, tmp_path_factory):
    """A worker with task events on (two jobs held at once, so that a third waits in Redis), a client, a
    Celery app (as Flower's) and the event stream of its database."""
    url = new_database()
    config = tmp_path_factory.mktemp("configs") / "tiny-llama-events.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny-llama-events", "path": str(tiny_llama), "context_length": 2048}))
    worker = start_worker(config, name="states@tests", redis_url=url, env={"BELLE_TASK_EVENTS": "true", "BELLE_WORKER_CONCURRENCY": "2"})
    settings = Settings(redis_url=url, task_events=True)
    app = make_sender(settings)
    with EventLog(app) as events, JobClient(settings) as client:
        yield worker, client, app, events
    app.close()
    assert worker.alive(), worker.log[-4000:]


def job_failed(record) -> str:
    """What Celery shows as the exception of a failed job's task: its error code and message."""
    return f"JobFailed({f'{record.error.code.value}: {record.error.message}'!r})"


def test_a_failed_or_expired_job_is_a_celery_failure_naming_its_error_and_a_good_one_a_success(monitored):
    worker, client, _, events = monitored
    good = client.submit({"prompt": "hello", **SHORT})
    assert client.wait(good, 60).state is JobState.SUCCEEDED
    assert events.end(good)["type"] == "task-succeeded"

    # A message as the producer writes it, with a request the worker refuses; one whose deadline passed before it ran.
    invalid, expired = new_job_id(), new_job_id()
    client.redis.lpush(QUEUE, task_message(invalid, {"prompt": "hi", "num_beams": 1, "max_new_tokens": -1}, QUEUE))
    client.redis.lpush(QUEUE, task_message(expired, {"prompt": "hi", **SHORT, "deadline": time.time() - 60}, QUEUE))
    # A prompt longer than the worker's model takes.
    too_long = client.submit({"prompt": "word " * 2100, **SHORT})

    for job_id, state, code in ((invalid, JobState.FAILED, ErrorCode.INVALID_REQUEST), (expired, JobState.EXPIRED, ErrorCode.EXPIRED),
                                (too_long, JobState.FAILED, ErrorCode.CONTEXT_LENGTH_EXCEEDED)):
        record = wait_for(lambda: (r := client.store.get(job_id)) is not None and r.state.is_final and r, 60, f"job {job_id} ends")
        assert (record.state, record.error.code) == (state, code)
        end = events.end(job_id)
        assert (end["type"], end.get("exception")) == ("task-failed", job_failed(record))
        # One line, no traceback; and the message is acknowledged, never handed back to its queue.
        assert f"Task belle.generate[{job_id}] raised expected: {job_failed(record)}\n" in worker.log
    assert "Traceback" not in worker.log
    wait_for(lambda: client.redis.hlen("unacked") == 0, 30, "no message is left unacknowledged")
    stays(lambda: client.redis.llen(QUEUE) == 0 and not any(f"job {j} is already" in worker.log for j in (invalid, expired, too_long)), 1.0,
          "no message of an ended job comes back")


def test_a_revoke_cancels_a_queued_job_and_a_running_one_without_killing_its_batch(monitored):
    worker, client, app, events = monitored
    victim, mate = (client.submit({"prompt": prompt, **LONG, "stream": True}) for prompt in ("写一篇关于太空探索的科幻短文", "今天天气很好"))
    wait_for(lambda: client.redis.exists(keys.job_chunks(victim), keys.job_chunks(mate)) == 2, 60, "both long jobs decode")
    queued = client.submit({"prompt": "never runs", **LONG})  # the worker holds two jobs at once: this one waits in Redis
    assert client.status(queued) is JobState.QUEUED

    app.control.revoke(queued)  # as Flower's Revoke sends it: a broadcast, no reply
    wait_for(lambda: client.status(queued) is JobState.CANCELLED, 30, "the revoked queued job ends cancelled")
    assert client.get(queued).error.code is ErrorCode.CANCELLED and client.get(queued).attempts == 0
    assert app.control.inspect(timeout=10, limit=1).revoked() == {worker.name: [queued]}, "Celery's own bookkeeping holds it"

    # terminate=True (Flower's Terminate) cancels too, and kills nothing: the job beside it in the batch goes on.
    (reply,) = app.control.revoke(victim, terminate=True, reply=True, timeout=10, limit=1)
    assert "cancellation requested" in reply[worker.name]["ok"]
    record = client.wait(victim, 60)
    assert record.state is JobState.CANCELLED and record.cancel_requested_at is not None
    (sequence,) = record.result.sequences
    assert sequence.finish_reason is FinishReason.CANCELLED and 0 < len(sequence.token_ids) < 600
    assert events.end(victim)["type"] == "task-revoked"
    beside = client.wait(mate, 120)
    assert beside.state is JobState.SUCCEEDED and beside.result.timings.batch_size == 2
    assert events.end(mate)["type"] == "task-succeeded"

    # The queued job's message, once taken, is acknowledged unread (REVOKED); the worker serves the next job.
    assert events.end(queued)["type"] == "task-revoked"
    after = client.submit({"prompt": "behind them", **SHORT})
    assert client.wait(after, 60).state is JobState.SUCCEEDED and events.end(after)["type"] == "task-succeeded"
    assert client.get(queued).state is JobState.CANCELLED and f"job {queued} is already" not in worker.log
    wait_for(lambda: client.redis.hlen("unacked") == 0, 30, "no message is left unacknowledged")
    assert worker.alive() and "Terminating" not in worker.log


def test_a_revoked_id_that_comes_back_as_a_new_job_runs(monitored):
    """Celery remembers revoked ids for hours; a job's record may expire sooner, and its idempotency key
    bring the id back as a new job, which must run, not be dropped as revoked."""
    worker, client, app, _ = monitored
    request = {"prompt": "once", **SHORT, "idempotency_key": f"states-{new_job_id()}"}
    job_id = client.submit({**request, **LONG, "stream": True})
    wait_for(lambda: client.redis.exists(keys.job_chunks(job_id)), 60, "the job decodes")
    assert client.cancel(job_id).outcome == "requested"
    assert client.wait(job_id, 60).state is JobState.CANCELLED
    (reply,) = app.control.revoke(job_id, reply=True, timeout=10, limit=1)
    assert "already cancelled" in reply[worker.name]["ok"]
    assert job_id in app.control.inspect(timeout=10, limit=1).revoked()[worker.name]

    client.redis.delete(keys.job(job_id))  # as once BELLE_RESULT_TTL_S has passed
    assert client.submit(request) == job_id
    record = client.wait(job_id, 60)
    assert record.state is JobState.SUCCEEDED and record.attempts == 1
    assert job_id not in app.control.inspect(timeout=10, limit=1).revoked()[worker.name]


def test_remote_control_answers_revoke_and_inspection_only(monitored):
    worker, _, app, _ = monitored
    for command in ("shutdown", "pool_shrink", "enable_events", "no_such_command") * 2:
        (reply,) = app.control.broadcast(command, reply=True, timeout=10, limit=1)
        assert f"{command!r} refused" in reply[worker.name]["error"]
    assert app.control.ping(timeout=10, limit=1) == [{worker.name: {"ok": "pong"}}]
    assert worker.alive()
    assert worker.log.count("refused the remote control command 'shutdown'") == 1, "logged once per command"
