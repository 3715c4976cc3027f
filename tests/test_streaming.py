"""Per-row streaming and cancellation in the continuous decoding batch, in-process on the real tiny
models (a collector stands in for Redis here; tests/test_stream_and_cancel.py uses a real one), plus
the pure pieces (what may be sent, incremental decoding, the follower's bookkeeping)."""

from __future__ import annotations

import pytest

from producer.records import FinishReason, JobRecord, JobState, StreamChunk, StreamEnd
from producer.schemas import parse_request
from producer.settings import Settings
from producer.streaming import StreamFollower, texts_so_far
from worker.scheduling.batcher import Batcher
from worker.model.engine import Engine
from worker.model.model_config import ModelConfig
from worker.model.detokenize import REPLACEMENT, IncrementalText, JobStream, sendable

# Chinese and emoji prompts: the tiny tokenizers split such characters over several byte-level tokens.
PROMPTS = ["请解释什么是人工智能", "🚀🌍😀 写一篇关于太空探索的科幻短文", "北京是中国的首都。上海", "温度控制输出的随机性 ✨", "Hello 你好"]
NEW_TOKENS = 40


@pytest.fixture(scope="module", params=["bloom", "llama"])
def engine(request) -> Engine:
    path = request.getfixturevalue(f"tiny_{request.param}")
    return Engine.load(ModelConfig(name=f"tiny-{request.param}", path=str(path), context_length=512), "cpu")


class Collector:
    """Stands in for Redis: records what each step published, and cancels a job after N of its chunks."""

    def __init__(self, cancel_after: dict[str, int] | None = None):
        self.steps: list[list[StreamChunk]] = []
        self.cancel_after = cancel_after or {}

    def publish(self, chunks: list[StreamChunk], then=None, output_events=None) -> None:
        if chunks:
            self.steps.append(list(chunks))
        if then is not None:
            then()

    def chunks(self, job_id: str) -> list[StreamChunk]:
        return [c for step in self.steps for c in step if c.job_id == job_id]

    def is_cancelled(self, job_id: str) -> bool:
        return job_id in self.cancel_after and len(self.chunks(job_id)) >= self.cancel_after[job_id]


def prepare(engine, job_id, **data):
    return engine.prepare(job_id, parse_request({"num_beams": 1, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, **data}))


def run(engine, jobs, collector: Collector, *, interval_ms: float = 0) -> dict:
    settings = Settings(batch_wait_ms=50, batch_max_delay_ms=500, stream_interval_ms=interval_ms)
    batcher = Batcher(engine, settings, publisher=collector, cancellations=collector).start()
    try:
        futures = [batcher.submit(job) for job in jobs]
        return {g.job_id: g for g in (f.result(timeout=120) for f in futures)}
    finally:
        batcher.stop()


def test_chunks_of_each_job_concatenate_to_its_final_text_and_never_split_a_character(engine):
    jobs = [prepare(engine, f"s{i}", prompt=p, stream=True) for i, p in enumerate(PROMPTS)]
    jobs.append(prepare(engine, "quiet", prompt="不流式的任务", stream=False))
    collector = Collector()
    results = run(engine, jobs, collector)

    assert not collector.chunks("quiet"), "a non-streaming job publishes nothing"
    partial_characters = 0
    for job in jobs[:-1]:
        chunks = collector.chunks(job.job_id)
        assert [c.seq for c in chunks] == list(range(len(chunks))), "sequence numbers are gap-free from 0"
        assert all(c.job_id == job.job_id and c.index == 0 and c.attempt == 1 for c in chunks)
        # Chunks are only ever appended, so equality means no chunk ended inside a character: its
        # replacement mark would be in the concatenation, not in the final text.
        assert "".join(c.text for c in chunks) == results[job.job_id].result.sequences[0].text
        assert len(chunks) > 5, "the text arrived over many steps, not at the end"
        # Control: decoding this job's tokens step by step does end inside a character sometimes.
        ids = results[job.job_id].result.sequences[0].token_ids
        partial_characters += sum(engine.tokenizer.decode(ids[:k]).endswith(REPLACEMENT) for k in range(1, len(ids)))
    assert partial_characters > 0, "the prompts should make the model emit multi-byte characters over several tokens"
    # One publish (one Redis pipeline) per decoding step, carrying the chunks of several jobs.
    assert len(collector.steps) <= NEW_TOKENS
    assert max(len({c.job_id for c in step}) for step in collector.steps) > 1


def test_a_stream_interval_sends_fewer_larger_chunks_and_the_first_at_once(engine):
    job = prepare(engine, "slow", prompt=PROMPTS[0], stream=True, max_new_tokens=300, min_new_tokens=100)
    collector = Collector()
    sequence = run(engine, [job], collector, interval_ms=25)["slow"].result.sequences[0]
    chunks = collector.chunks("slow")
    assert "".join(c.text for c in chunks) == sequence.text
    assert 2 <= len(chunks) < 100, "about one chunk per 25 ms, not one per token"
    incremental = IncrementalText(engine.decode)
    first_text = next(k for k in range(1, len(sequence.token_ids) + 1) if sendable(incremental.push(sequence.token_ids[:k]), []))
    assert chunks[0].tokens == first_text, "the first chunk goes out as soon as there is text to send"


def test_streaming_does_not_change_what_is_generated(engine):
    plain = [prepare(engine, f"p{i}", prompt=p) for i, p in enumerate(PROMPTS)]
    streamed = [prepare(engine, f"p{i}", prompt=p, stream=True) for i, p in enumerate(PROMPTS)]
    expected = {job.job_id: engine.generate_batch([job])[0].result.sequences for job in plain}
    assert {k: g.result.sequences for k, g in run(engine, streamed, Collector()).items()} == expected


def test_a_stop_string_is_never_streamed(engine):
    (probe,) = engine.generate_batch([prepare(engine, "probe", prompt=PROMPTS[0])])
    text = probe.result.sequences[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    job = prepare(engine, "stop", prompt=PROMPTS[0], stream=True, stop=[stop])
    collector = Collector()
    sequence = run(engine, [job], collector)["stop"].result.sequences[0]
    assert sequence.finish_reason is FinishReason.STOP and stop not in sequence.text
    assert "".join(c.text for c in collector.chunks("stop")) == sequence.text
    assert len(sequence.token_ids) < NEW_TOKENS, "generation ended at the stop string"


def test_sampling_streams_each_returned_sequence_separately(engine):
    job = prepare(engine, "n3", prompt=PROMPTS[1], stream=True, do_sample=True, seed=3, num_return_sequences=3)
    collector = Collector()
    generated = run(engine, [job], collector)["n3"]
    chunks = collector.chunks("n3")
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    for sequence in generated.result.sequences:
        assert "".join(c.text for c in chunks if c.index == sequence.index) == sequence.text


def test_a_cancelled_job_stops_early_and_its_batch_mates_are_unaffected(engine):
    jobs = [prepare(engine, "victim", prompt=PROMPTS[0], stream=True), prepare(engine, "mate", prompt=PROMPTS[2], stream=True),
            prepare(engine, "quiet", prompt=PROMPTS[3])]
    alone = {j.job_id: engine.generate_batch([j])[0].result.sequences for j in jobs}
    collector = Collector(cancel_after={"victim": 3})
    results = run(engine, jobs, collector)

    victim = results["victim"]
    assert victim.cancelled
    (sequence,) = victim.result.sequences
    assert sequence.finish_reason is FinishReason.CANCELLED
    assert 0 < len(sequence.token_ids) < NEW_TOKENS
    assert sequence.token_ids == alone["victim"][0].token_ids[: len(sequence.token_ids)], "what it kept is what it had generated"
    assert "".join(c.text for c in collector.chunks("victim")) == sequence.text
    for job_id in ("mate", "quiet"):
        assert not results[job_id].cancelled
        assert results[job_id].result.sequences == alone[job_id]
        assert results[job_id].result.timings.batch_size == 3


def test_cancelling_a_beam_search_job_ends_it_early(engine):
    jobs = [engine.prepare(f"b{i}", parse_request({"prompt": p, "num_beams": 2, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}))
            for i, p in enumerate(PROMPTS[:2])]
    calls = {"n": 0}

    def is_cancelled(job_id: str) -> bool:
        calls["n"] += 1
        return job_id == "b0" and calls["n"] > 10

    results = {g.job_id: g for g in engine.generate_batch(jobs, is_cancelled)}
    assert results["b0"].cancelled and len(results["b0"].result.sequences[0].token_ids) < NEW_TOKENS
    assert not results["b1"].cancelled and len(results["b1"].result.sequences[0].token_ids) == NEW_TOKENS


# --- the pure pieces ---


def test_sendable_holds_back_partial_stop_strings_and_characters():
    assert sendable("hello wor", ["world"]) == "hello "
    assert sendable("hello world and more", ["world"]) == "hello "
    assert sendable("hello", ["x"]) == "hello"
    assert sendable("你好" + REPLACEMENT, []) == "你好"
    assert sendable("abc。", ["。。"]) == "abc"


def test_job_stream_sends_only_what_is_new_and_flushes_at_the_end():
    stream = JobStream("j", 1, 1, ["STOP"])
    assert stream.advance(0, "Hel", 1).text == "Hel"
    assert stream.advance(0, "Hel", 2) is None
    assert stream.advance(0, "Hello ST", 3).text == "lo "
    final = stream.advance(0, "Hello ", 4, final=True)
    assert final is None  # the final text ends before the stop string: everything was sent
    assert [stream.next_seq, stream.sent] == [2, ["Hello "]]


def test_incremental_text_equals_decoding_the_whole_sequence_at_every_complete_character(engine):
    ids = engine.tokenize("北京是中国的首都。🚀🌍😀 Emoji and symbols: — «quotes» 温度控制输出的随机性")
    text = IncrementalText(engine.decode)
    for k in range(1, len(ids) + 1):
        whole = engine.decode(ids[:k])
        assert whole.startswith(text.push(ids[:k]))
        if not whole.endswith(REPLACEMENT):
            assert text.text == whole
    assert text.text == engine.decode(ids)


def test_the_follower_replays_in_order_and_ends_once():
    follower = StreamFollower("j")
    chunk = StreamChunk(job_id="j", seq=0, index=0, text="你", tokens=1, attempt=1).model_dump_json()
    end = StreamEnd(job_id="j", state=JobState.SUCCEEDED, finish_reasons=[FinishReason.LENGTH]).model_dump_json()
    events = follower.take([["belle:job:j:chunks", [("1-0", {"event": chunk}), ("2-0", {"event": end}), ("3-0", {"event": chunk})]]])
    assert [type(e) for e in events] == [StreamChunk, StreamEnd] and follower.done and follower.last_id == "3-0"

    quiet = StreamFollower("k")
    events = quiet.from_record(JobRecord(job_id="k", state=JobState.FAILED))
    assert events == [StreamEnd(job_id="k", state=JobState.FAILED)] and quiet.done


def test_texts_so_far_are_the_latest_attempts_chunks_per_sequence():
    def entry(n, event):
        return (f"{n}-0", {"event": event.model_dump_json()})

    chunks = [StreamChunk(job_id="j", seq=0, index=0, text="old", tokens=1, attempt=1),
              StreamChunk(job_id="j", seq=0, index=1, text="b", tokens=1, attempt=2),
              StreamChunk(job_id="j", seq=1, index=0, text="a", tokens=1, attempt=2),
              StreamChunk(job_id="j", seq=2, index=1, text="c", tokens=2, attempt=2)]
    entries = [entry(n, c) for n, c in enumerate(chunks)] + [("9-0", {"event": "not json"})]
    assert texts_so_far(entries) == ["a", "bc"]
    assert texts_so_far([]) == [] and texts_so_far(None) == []
