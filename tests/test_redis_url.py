"""Sentinel URLs (producer/redis_url.py) and the writes that wait for replicas (producer/durability.py)."""

from __future__ import annotations

import asyncio

import pytest
import redis.sentinel
from kombu import Connection

from producer import keys
from producer.aio import AsyncJobClient
from producer.client import JobClient
from producer.connection import check_url, describe_error
from producer.errors import InvalidRequestError, NotReplicatedError
from producer.queueing import celery_config
from producer.redis_url import RedisURLError, parse_sentinel_url, where
from producer.sentinel_transport import SentinelListChannel
from producer.records import JobState
from producer.settings import Settings, masked_url

URL = "sentinel://:s3cret@h1:26379;sentinel://h2:26380;sentinel://[::1]/2?master_name=belle&sentinel_password=other"


def test_a_sentinel_url_names_every_sentinel_the_primary_its_credentials_and_database():
    parsed = parse_sentinel_url(URL)
    assert parsed.sentinels == (("h1", 26379), ("h2", 26380), ("::1", 26379))
    assert (parsed.master_name, parsed.db, parsed.username, parsed.password, parsed.tls) == ("belle", 2, None, "s3cret", False)
    assert parsed.sentinel_kwargs()["password"] == "other" and parsed.primary_kwargs()["password"] == "s3cret"
    tls = parse_sentinel_url("sentinels://a:1;sentinels://b:2/0?master_name=m&ssl_ca_certs=/ca.pem")
    assert tls.tls and tls.primary_kwargs()["ssl"] and tls.sentinel_kwargs()["ssl_ca_certs"] == "/ca.pem"


@pytest.mark.parametrize(("url", "problem"), [
    ("sentinel://h1:26379;sentinel://h2:26379/0", "master_name=NAME"),
    ("sentinel://h1:26379;redis://h2:6379/0?master_name=m", "same sentinel://"),
    ("sentinel://h1:26379/0?master_name=m&colour=red", "unknown option 'colour'"),
    ("sentinel://h1:26379/1;sentinel://h2:26379/2?master_name=m", "different databases"),
    ("sentinel://:a@h1:26379;sentinel://:b@h2:26379/0?master_name=m", "different user:password@"),
    ("sentinel://h1:99999/0?master_name=m", "port of h1"),
    ("sentinel://h1:26379/zero?master_name=m", "not a number"),
])
def test_a_sentinel_url_that_cannot_work_is_refused_naming_what_to_fix(url, problem):
    with pytest.raises(RedisURLError, match=problem):
        parse_sentinel_url(url)
    with pytest.raises(InvalidRequestError) as refused:
        check_url(url)
    assert refused.value.parameter == "redis_url" and "master_name=NAME" in str(refused.value)


def test_passwords_of_a_sentinel_url_are_masked_in_every_part_and_never_named_in_messages():
    shown = masked_url(URL)
    assert "s3cret" not in shown and "other" not in shown and shown.count(";") == 2
    assert "s3cret" not in where(URL) and "belle" in where(URL)


def test_celery_takes_a_sentinel_url_as_kombus_sentinel_transport_with_the_master_name():
    config = celery_config(Settings(redis_url=URL))
    broker = Connection(config["broker_url"], transport=config["broker_transport"], transport_options=config["broker_transport_options"])
    assert (broker.hostname, broker.port, broker.password, broker.virtual_host) == ("h1", 26379, "s3cret", "2")
    assert ";" not in config["broker_url"] and len(broker.alt) <= 1, "no alternate URL: kombu would move a failing connection to its stock transport"
    assert broker.transport.Channel is SentinelListChannel and "sentinels" in SentinelListChannel.from_transport_options
    assert broker.transport_options["sentinels"] == [["h1", 26379], ["h2", 26380], ["::1", 26379]]
    with pytest.raises(redis.sentinel.MasterNotFoundError) as asked:  # (a channel asks the sentinels at once: every one of them)
        broker.channel()
    assert all(f"host={host},port={port}" in str(asked.value) for host, port in (("h1", 26379), ("h2", 26380), ("::1", 26379)))
    odd = Connection(celery_config(Settings(redis_url="sentinel://:p%40ss%2Fw%23rd%25@h1/5?master_name=m"))["broker_url"])
    assert (odd.password, odd.hostname, odd.virtual_host) == ("p@ss/w#rd%", "h1", "5"), "credentials quoted as kombu reads them"
    options = config["broker_transport_options"]
    assert options["master_name"] == "belle" and options["sentinel_kwargs"]["password"] == "other"
    assert options["visibility_timeout"] == Settings().visibility_timeout_s
    assert "broker_use_ssl" not in config
    assert celery_config(Settings(redis_url="sentinels://a:1/0?master_name=m&ssl_ca_certs=/ca.pem"))["broker_use_ssl"] == {"ssl_ca_certs": "/ca.pem"}


def test_no_sentinel_answering_is_described_with_what_to_check():
    with JobClient(Settings(redis_url="sentinel://127.0.0.1:1/0?master_name=belle")) as client, pytest.raises(Exception) as failed:
        client.submit({"prompt": "hi"})
    assert "no sentinel named a reachable primary" in describe_error(failed.value, client.settings.redis_url)


def test_a_submit_no_replica_confirms_raises_naming_the_job_which_is_queued_and_an_idempotent_retry_waits_again(new_database):
    url = new_database()  # (a Redis without replicas: WAIT confirms nothing)
    with JobClient(Settings(redis_url=url, wait_replicas=1, wait_timeout_ms=50)) as client:
        with pytest.raises(NotReplicatedError) as refused:
            client.submit({"prompt": "hi", "idempotency_key": "durable-1"})
        job_id = refused.value.job_id
        assert "0 of the 1 replicas" in str(refused.value) and f"status {job_id}" in str(refused.value)
        assert client.get(job_id).state is JobState.QUEUED, "the job is queued: only its durability is unconfirmed"
        with pytest.raises(NotReplicatedError):  # the repeat wrote nothing itself, and still waits for the first write
            client.submit({"prompt": "hi", "idempotency_key": "durable-1"})
        assert client.redis.llen(keys.QUEUE_INTERACTIVE) == 1
        with pytest.raises(InvalidRequestError, match="idempotency_key"):  # a conflict is the error reported, not the WAIT
            client.submit({"prompt": "another", "idempotency_key": "durable-1"})
        with pytest.raises(NotReplicatedError):
            client.cancel(job_id)
        assert client.get(job_id).state is JobState.CANCELLED
        with pytest.raises(NotReplicatedError, match="submitted whole"):
            client.submit_batch([{"prompt": "a"}, {"prompt": "b"}])

    async def from_asyncio() -> None:
        client = AsyncJobClient(Settings(redis_url=url, wait_replicas=1, wait_timeout_ms=50))
        try:
            with pytest.raises(NotReplicatedError):
                await client.submit({"prompt": "hi"})
        finally:
            await client.close()

    asyncio.run(from_asyncio())


def test_without_wait_replicas_a_submit_never_waits(new_database):
    with JobClient(Settings(redis_url=new_database(), wait_timeout_ms=60_000)) as client:
        job_id = client.submit({"prompt": "hi"})
        assert client.get(job_id).state is JobState.QUEUED
        assert client.redis.get(keys.REPLICATION_MARK) is None


def test_a_waiting_client_returns_a_final_state_only_once_replicas_hold_it(new_database):
    url = new_database()  # (no replicas: none ever confirms)
    with JobClient(Settings(redis_url=url)) as plain, JobClient(Settings(redis_url=url, wait_replicas=1, wait_timeout_ms=50)) as durable:
        job_id = plain.submit({"prompt": "hi"})
        plain.cancel(job_id)
        assert plain.wait(job_id, 5).state is JobState.CANCELLED
        with pytest.raises(NotReplicatedError, match=f"job {job_id} ended cancelled"):
            durable.wait(job_id, 0.3)

        async def from_asyncio() -> None:
            client = AsyncJobClient(Settings(redis_url=url, wait_replicas=1, wait_timeout_ms=50))
            try:
                with pytest.raises(NotReplicatedError, match="ended cancelled"):
                    await client.wait(job_id, 0.3)
            finally:
                await client.close()

        asyncio.run(from_asyncio())
