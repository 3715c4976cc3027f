"""LoRA adapters (peft) and 8/4-bit quantisation (bitsandbytes) on the real tiny models, in-process
and through a real worker."""

from __future__ import annotations

import ast
import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from producer.client import JobClient
from producer.errors import ErrorCode
from producer.records import JobState
from producer.schemas import parse_request
from producer.settings import Settings
from tests.conftest import WorkerProcess
from tests.test_real_model import run_batched
from worker.model.engine import Engine
from worker.errors import JobFailure
from worker.model.import_noise import BITSANDBYTES_CPU_LOGGER
from worker.model.model_config import ModelConfig, load_model_config
from worker.model.warmup import ModelNotServable, unsuited_4bit_layers
from worker.ops.tiny_model import TinyModelSpec, build_tiny_adapter, build_tiny_model

PROMPTS = ["请解释什么是人工智能", "What is machine learning?", "北京是中国的首都", "写一篇关于环保的短文"]


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, tiny_bloom, tiny_llama) -> dict[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("adapters")
    return {arch: {name: str(build_tiny_adapter(base, root / f"{arch}-{name}", seed=seed)) for name, seed in (("poet", 1), ("coder", 2))}
            for arch, base in (("bloom", tiny_bloom), ("llama", tiny_llama))}


@pytest.fixture(scope="module", params=["bloom", "llama"])
def lora_engine(request, adapters) -> Engine:
    base = request.getfixturevalue(f"tiny_{request.param}")
    return Engine.load(ModelConfig(name=f"tiny-{request.param}", path=str(base), context_length=256, adapters=adapters[request.param]), "cpu")


def jobs_with_adapters(engine: Engine, **params):
    return [engine.prepare(f"{adapter or 'base'}-{i}", parse_request({"prompt": prompt, "adapter": adapter, "max_new_tokens": 12, **params}))
            for i, prompt in enumerate(PROMPTS) for adapter in (None, "poet", "coder")]


def test_jobs_with_different_adapters_decode_in_one_batch_each_as_with_its_adapter_alone(lora_engine):
    jobs = jobs_with_adapters(lora_engine, num_beams=1, min_new_tokens=12)
    alone = {job.job_id: lora_engine.generate_batch([job])[0].result for job in jobs}
    results = run_batched(lora_engine, jobs)
    for job in jobs:
        assert results[job.job_id].sequences == alone[job.job_id].sequences, job.job_id
        assert results[job.job_id].adapter == job.request.adapter
        assert results[job.job_id].timings.batch_size == len(jobs)
    # Control: the adapters change what is generated.
    for i in range(len(PROMPTS)):
        texts = {alone[f"{a}-{i}"].sequences[0].token_ids.__repr__() for a in ("base", "poet", "coder")}
        assert len(texts) == 3


def test_beam_search_jobs_with_different_adapters_decode_together_each_as_with_its_adapter_alone(lora_engine):
    """In the decoding batch (every beam of a job runs with its job's adapter) and in one generate() call."""
    jobs = jobs_with_adapters(lora_engine, num_beams=3, num_return_sequences=2)
    alone = {job.job_id: lora_engine.generate_batch([job])[0].result for job in jobs}
    together = {g.job_id: g.result for g in lora_engine.generate_batch(jobs)}
    batched = run_batched(lora_engine, jobs)
    for job in jobs:
        want = [(s.token_ids, s.finish_reason) for s in alone[job.job_id].sequences]
        assert [(s.token_ids, s.finish_reason) for s in together[job.job_id].sequences] == want
        assert [(s.token_ids, s.finish_reason) for s in batched[job.job_id].sequences] == want
        assert together[job.job_id].timings.batch_size == len(jobs) and batched[job.job_id].timings.batch_size > 1


def test_an_adapter_the_worker_does_not_serve_is_refused_with_the_served_names(lora_engine, tiny_bloom):
    with pytest.raises(JobFailure) as info:
        lora_engine.prepare("j", parse_request({"prompt": "hi", "adapter": "lawyer"}))
    assert info.value.error.code is ErrorCode.INVALID_REQUEST and info.value.error.parameter == "adapter"
    assert "['coder', 'poet']" in info.value.error.message and "'lawyer'" in info.value.error.message
    plain = Engine.load(ModelConfig(name="plain", path=str(tiny_bloom), context_length=256), "cpu")
    with pytest.raises(JobFailure, match=r"serves \(\[\]\)"):
        plain.prepare("j", parse_request({"prompt": "hi", "adapter": "poet"}))


def test_adapter_names_in_a_config_cannot_be_paths_and_their_folders_resolve_from_the_config(tmp_path):
    for name in ("../etc", "/abs", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="adapter name"):
            ModelConfig(name="m", path="p", adapters={name: "x"})
    (tmp_path / "lora").mkdir()
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"name": "m", "path": "base", "adapters": {"poet": "lora"}}))
    config = load_model_config(str(tmp_path / "m.yaml"), Settings())
    assert config.adapters == {"poet": str((tmp_path / "lora").resolve())}


def test_peft_is_imported_only_when_adapters_are_configured(tiny_bloom):
    code = ("import sys; from worker.model.engine import Engine; from worker.model.model_config import ModelConfig; "
            f"Engine.load(ModelConfig(name='t', path={str(tiny_bloom)!r}), 'cpu'); print('peft' in sys.modules, 'bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_quantised_weights_load_and_generate_on_cpu(request, arch, mode):
    path = request.getfixturevalue(f"tiny_{arch}")
    engine = Engine.load(ModelConfig(name=f"tiny-{arch}-{mode}", path=str(path), context_length=256, quantization=mode), "cpu")
    full = AutoModelForCausalLM.from_pretrained(path)
    assert engine.model.get_memory_footprint() < 0.9 * full.get_memory_footprint()
    assert type(engine.model.get_submodule("lm_head")).__name__ == "Linear"  # the output layer stays full precision
    assert any(type(m).__module__.startswith("bitsandbytes") for m in engine.model.modules())
    jobs = [engine.prepare(f"q{i}", parse_request({"prompt": p, "num_beams": 1, "max_new_tokens": 10, "min_new_tokens": 10})) for i, p in enumerate(PROMPTS)]
    alone = {job.job_id: engine.generate_batch([job])[0].result for job in jobs}
    batched = run_batched(engine, jobs)
    for job in jobs:
        assert len(batched[job.job_id].sequences[0].token_ids) == 10
        # Same tokens from generate() alone and from the decoding batch (quantised matmuls add noise
        # between batch shapes, so compare the first tokens, where it has not accumulated).
        assert batched[job.job_id].sequences[0].token_ids[:3] == alone[job.job_id].sequences[0].token_ids[:3]


@pytest.fixture(scope="session")
def bloom_unsuited_to_4bit(tmp_path_factory) -> Path:
    """A tiny BLOOM whose layer sizes bitsandbytes' repacked 4-bit CPU kernel refuses: in_features 48 (not a
    multiple of the block size, 64), out_features 144 (not a multiple of 32)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bloom-48", TinyModelSpec(hidden_size=48))


def test_the_4bit_layers_whose_sizes_the_kernel_refuses_are_named_with_the_size_at_fault(bloom_unsuited_to_4bit, tiny_bloom):
    from bitsandbytes.functional import has_avx512bf16

    if has_avx512bf16():
        pytest.skip("on a CPU with AVX512-BF16 bitsandbytes refuses these layer sizes, so the model does not load: the test below checks "
                    "the layers named there")
    odd = Engine.load(ModelConfig(name="odd", path=str(bloom_unsuited_to_4bit), context_length=256, quantization="4bit"), "cpu")
    named = unsuited_4bit_layers(odd.model)
    assert len(named) == 8 and "layer transformer.h.0.self_attention.query_key_value has in_features 48, not a multiple of the 4-bit block size 64" in named
    assert "layer transformer.h.1.mlp.dense_4h_to_h has out_features 48, not a multiple of 32" in named  # (in_features 192 suits)
    suited = Engine.load(ModelConfig(name="even", path=str(tiny_bloom), context_length=256, quantization="4bit"), "cpu")
    assert unsuited_4bit_layers(suited.model) == []


def test_4bit_weights_whose_layer_sizes_the_kernel_refuses_are_refused_at_load_naming_the_setting(bloom_unsuited_to_4bit):
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit layers (and refuses these sizes) only on CPUs with AVX512-BF16; on this one it dequantises, "
                    "and every layer size generates (see the test above for the layers it would name)")
    with pytest.raises(ModelNotServable, match=r"cannot generate with quantization mode 4bit: layer transformer\.h\.0\.self_attention\.query_key_value "
                                               r"has in_features 48, not a multiple of the 4-bit block size 64.*set quantization: 8bit or none"):
        Engine.load(ModelConfig(name="odd", path=str(bloom_unsuited_to_4bit), context_length=256, quantization="4bit"), "cpu")


def test_a_model_that_loads_but_cannot_generate_is_refused_at_load(tiny_bloom):
    with pytest.raises(ModelNotServable, match=r"model t loaded but has no memory left to generate \(a 2-token warm-up generation failed: OutOfMemoryError: "
                                               r"simulated: .* BELLE_FAULT_MEMORY_BUDGET_TOKENS=4\); free memory on the device"):
        Engine.load(ModelConfig(name="t", path=str(tiny_bloom), context_length=256), "cpu", fault_memory_budget_tokens=4)


@pytest.mark.slow  # starts its worker process itself: it must not be waited for as ready
def test_a_worker_whose_model_cannot_generate_stops_before_announcing_itself(new_database, bloom_config):
    url = new_database()
    worker = WorkerProcess(url, bloom_config, name="unservable@tests", env={"BELLE_FAULT_MEMORY_BUDGET_TOKENS": "4"})
    assert worker.process.wait(timeout=120) == 1, worker.log
    worker.stop()
    assert "error: model tiny-bloom loaded but has no memory left to generate" in worker.log and "Traceback" not in worker.log, worker.log
    assert " ready." not in worker.log
    with JobClient(Settings(redis_url=url)) as client:
        assert client.workers() == []


def _bitsandbytes_tries_the_kernels_package():
    """bitsandbytes' own code, from its source, that tries the optional ``kernels`` package (it runs at import on
    CPUs with AVX512-BF16 only, so a test elsewhere runs it from here)."""
    source = importlib.util.find_spec(BITSANDBYTES_CPU_LOGGER).origin
    for node in ast.walk(ast.parse(Path(source).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Try) and any(isinstance(n, ast.ImportFrom) and n.module == "kernels" for n in ast.walk(node)):
            return compile(ast.Module(body=[node], type_ignores=[]), source, "exec")
    raise AssertionError(f"{source} no longer tries the kernels package: review worker/model/import_noise.py")


def test_bitsandbytes_missing_its_optional_kernels_package_is_not_logged_while_its_other_failures_are(caplog):
    if importlib.util.find_spec("kernels") is not None:
        pytest.skip("the optional kernels package is installed here")
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)  # (its filter is installed when worker.model.engine is imported)
    namespace = {"logger": logger}
    with caplog.at_level(logging.WARNING):
        exec(_bitsandbytes_tries_the_kernels_package(), namespace)
        assert namespace["gemm_4bit_forward_kernel"] is None, "the attempt failed, as it does without the package"
        assert not [r for r in caplog.records if r.name == BITSANDBYTES_CPU_LOGGER], caplog.text
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", OSError("the hub cannot be reached"))
    assert [r.getMessage() for r in caplog.records if r.name == BITSANDBYTES_CPU_LOGGER] == [
        "Failed to load CPU gemm_4bit_forward from kernels-community: the hub cannot be reached"]


def test_a_worker_serves_its_adapters_through_the_queue(new_database, start_worker, tiny_bloom, adapters, tmp_path_factory):
    config = tmp_path_factory.mktemp("configs") / "tiny-bloom-lora.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny-bloom-lora", "path": str(tiny_bloom), "context_length": 256, "adapters": adapters["bloom"]}))
    url = new_database()
    worker = start_worker(config, name="lora@tests", redis_url=url)
    with JobClient(Settings(redis_url=url)) as client:
        ids = {a: client.submit({"prompt": "你好", "adapter": a, "num_beams": 1, "max_new_tokens": 8}) for a in ("poet", "coder", None)}
        unknown = client.submit({"prompt": "你好", "adapter": "lawyer"})
        records = {a: client.wait(job_id, 120) for a, job_id in ids.items()}
        assert all(r.state is JobState.SUCCEEDED for r in records.values())
        assert {a: r.result.adapter for a, r in records.items()} == {"poet": "poet", "coder": "coder", None: None}
        assert len({tuple(r.result.sequences[0].token_ids) for r in records.values()}) == 3
        failed = client.wait(unknown, 60)
        assert failed.state is JobState.FAILED and failed.error.code is ErrorCode.INVALID_REQUEST and "['coder', 'poet']" in failed.error.message
    assert worker.alive() and "adapters: coder, poet" in worker.log
    assert "No module named 'kernels'" not in worker.log  # (bitsandbytes tries that optional package on CPUs with AVX512-BF16)
