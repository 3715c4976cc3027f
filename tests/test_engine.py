"""The engine in-process, on both tiny architectures (BLOOM like BELLE-7B-2M, and LLaMA)."""

from __future__ import annotations

import pytest

from producer.records import FinishReason
from producer.schemas import parse_request
from worker.model.engine import Engine
from worker.model.model_config import ModelConfig


@pytest.fixture(scope="module", params=["bloom", "llama"])
def engine(request) -> Engine:
    path = request.getfixturevalue(f"tiny_{request.param}")
    return Engine.load(ModelConfig(name=f"tiny-{request.param}", path=str(path), context_length=256), "cpu")


def run(engine: Engine, data: dict, job_id: str = "j"):
    (generated,) = engine.generate_batch([engine.prepare(job_id, parse_request(data))])
    return generated.result


def test_the_checkpoint_loads_through_from_pretrained_and_generates(engine):
    result = run(engine, {"prompt": "请解释什么是人工智能", "num_beams": 1, "max_new_tokens": 12, "min_new_tokens": 12})
    (seq,) = result.sequences
    assert len(seq.token_ids) == 12 and seq.finish_reason is FinishReason.LENGTH
    assert seq.text == engine.tokenizer.decode(seq.token_ids, skip_special_tokens=True)
    assert result.usage.prompt_tokens == len(engine.tokenize("Human: 请解释什么是人工智能\n\nAssistant: "))


def test_eos_ends_a_sequence_and_is_not_in_the_text(engine):
    results = [run(engine, {"prompt": p, "num_beams": 1, "max_new_tokens": 40}) for p in ("Hello", "你好", "北京是中国的首都", "def f(x):", "The quick brown fox")]
    ended = [r.sequences[0] for r in results if r.sequences[0].finish_reason is FinishReason.EOS]
    assert ended, "the tiny models are calibrated to end some sequences"
    for seq in ended:
        assert engine.eos_token_id not in seq.token_ids


def test_only_jobs_with_the_same_generation_parameters_share_a_generate_call(engine):
    jobs = [engine.prepare(f"j{i}", parse_request({"prompt": "Hello", "num_beams": 2, "max_new_tokens": n})) for i, n in enumerate((4, 4, 6))]
    assert Engine.batch_key(jobs[0]) == Engine.batch_key(jobs[1]) != Engine.batch_key(jobs[2])
    out = {g.job_id: g.result for g in engine.generate_batch(jobs[:2])}
    assert [out[f"j{i}"].timings.batch_size for i in range(2)] == [2, 2]
    assert len(engine.generate_batch(jobs[2:])[0].result.sequences[0].token_ids) <= 6
