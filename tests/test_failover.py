"""High availability with Redis Sentinel, all real processes on loopback: a primary, a replica and three
sentinels; a worker and a client on a sentinel:// URL; the primary SIGKILLed mid-run (tests/failover.py)."""

from __future__ import annotations

import pytest

from tests.failover import run_failover
from tests.sentinels import SentinelGroup
from tests.test_reliability import FAST_REDELIVERY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def group():
    with SentinelGroup() as group:
        yield group


@pytest.fixture(scope="module")
def ha_worker(group, start_worker, bloom_config):
    return start_worker(bloom_config, name="ha@tests", redis_url=group.url, env=FAST_REDELIVERY)


# (In this order: the first run needs the group as it starts, its replica behind the link that can hold.)

def test_with_wait_no_returned_submit_is_lost_when_the_primary_dies_holding_writes_no_replica_has(group, ha_worker):
    run = run_failover(group, jobs=300, tag="waited", wait_replicas=1, wait_timeout_ms=500, partitioned=True)
    print(run.summary())
    assert run.submitted == 300
    assert run.lost == [], "every submit that returned was on the replica"
    assert run.refused > 0, "the submits made while the link held were refused, not confirmed"
    assert run.unchanged_after_rejoin
    assert ha_worker.alive(), "the worker followed the failover by itself"


def test_a_failover_loses_no_job_while_the_replica_keeps_up_and_the_old_primary_rejoins_as_a_replica(group, ha_worker):
    run = run_failover(group, jobs=300, tag="plain")
    print(run.summary())
    assert run.submitted == 300
    assert run.lost == [] and run.two_finals == []
    assert run.unchanged_after_rejoin
    assert ha_worker.alive()
