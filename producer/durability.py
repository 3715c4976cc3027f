"""Writes that wait for replicas (BELLE_WAIT_REPLICAS): a submit, or a job's final state, is followed on the
same connection by Redis's ``WAIT replicas timeout``, so that it returns only once that many replicas hold
it, and survives the loss of the primary (a Sentinel failover promotes one of them).

WAIT covers the writes made on its own connection. A write that changed nothing (an idempotent submit
repeated) does not move that connection's offset, and the write it repeats may have been made on another
connection: so a counter is written just before each WAIT, after everything the primary has already done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from producer import keys
from producer.errors import NotReplicatedError


@dataclass(frozen=True)
class Durability:
    replicas: int = 0
    timeout_ms: int = 1000

    @classmethod
    def of(cls, settings) -> Durability:
        return cls(settings.wait_replicas, settings.wait_timeout_ms)

    @property
    def waits(self) -> bool:
        return self.replicas > 0

    def add_wait(self, pipe) -> None:
        """Queue the marker write and the WAIT at the end of ``pipe`` (a pipeline without a transaction)."""
        if self.waits:
            pipe.incr(keys.REPLICATION_MARK)
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)

    def check(self, replies: list[Any], what: str, job_id: str | None = None) -> list[Any]:
        """The replies of the commands queued before ``add_wait``; raises NotReplicatedError (with those
        replies) when fewer replicas than asked for confirmed them."""
        if not self.waits:
            return replies
        confirmed = replies[-1]
        if isinstance(confirmed, Exception):
            raise confirmed
        if int(confirmed) < self.replicas:
            raise NotReplicatedError(what, int(confirmed), self.replicas, self.timeout_ms, job_id, replies=replies[:-2])
        return replies[:-2]

    def run(self, redis, script, what: str, job_id: str | None = None, **call) -> Any:
        """``script(**call)`` (a registered script of ``redis``), then the WAIT: its reply, or NotReplicatedError
        (whose ``replies[0]`` is the script's)."""
        if not self.waits:
            return script(**call)
        pipe = redis.pipeline(transaction=False)
        script(**call, client=pipe)
        self.add_wait(pipe)
        return self.check(pipe.execute(), what, job_id)[0]

    async def run_async(self, redis, script, what: str, job_id: str | None = None, **call) -> Any:
        """As ``run``, on a ``redis.asyncio`` client."""
        if not self.waits:
            return await script(**call)
        pipe = redis.pipeline(transaction=False)
        await script(**call, client=pipe)
        self.add_wait(pipe)
        return self.check(await pipe.execute(), what, job_id)[0]

    def confirm(self, redis, what: str) -> None:
        """Wait for the replicas to hold everything the primary has done so far (a write of its own, then WAIT)."""
        if self.waits:
            pipe = redis.pipeline(transaction=False)
            self.add_wait(pipe)
            self.check(pipe.execute(), what)

    def final_confirmed(self, redis, record, deadline: float) -> bool:
        """Whether a final record just read is on the replicas: a waiting client returns only such a one, so that
        a failover cannot take back a result it returned (the job would run again, with another). False to read
        it again (the primary may be gone, and the job run again); NotReplicatedError once ``deadline`` passed."""
        if not self.waits:
            return True
        try:
            self.confirm(redis, _final_read(record))
        except (NotReplicatedError, ResponseError):  # (a WAIT refused: a server just demoted, mid-failover)
            if time.monotonic() >= deadline:
                raise
            return False
        return True

    async def final_confirmed_async(self, redis, record, deadline: float) -> bool:
        """As ``final_confirmed``, on a ``redis.asyncio`` client."""
        if not self.waits:
            return True
        pipe = redis.pipeline(transaction=False)
        self.add_wait(pipe)
        try:
            self.check(await pipe.execute(), _final_read(record))
        except (NotReplicatedError, ResponseError):
            if time.monotonic() >= deadline:
                raise
            return False
        return True


def _final_read(record) -> str:
    return f"job {record.job_id} ended {record.state.value}, and a failover could still take that back until replicas hold it"
