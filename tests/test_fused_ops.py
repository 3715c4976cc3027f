"""The fused activations compute what the model's own modules compute."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.models.bloom.modeling_bloom import bloom_gelu_forward

from producer.schemas import parse_request
from worker.model.engine import Engine
from worker.model.fused_ops import FusedTanhGelu
from worker.model.model_config import ModelConfig


def test_fused_tanh_gelu_is_blooms_gelu():
    x = torch.linspace(-8, 8, 100_001)
    assert torch.allclose(FusedTanhGelu()(x), bloom_gelu_forward(x), atol=1e-6, rtol=0)
    # Control: the exact (erf) GeLU is a different function, and the same check tells them apart.
    assert not torch.allclose(F.gelu(x), bloom_gelu_forward(x), atol=1e-6, rtol=0)


def test_the_engine_fuses_blooms_activations_and_generates_what_the_stock_model_does(tiny_bloom):
    engine = Engine.load(ModelConfig(name="tiny-bloom", path=str(tiny_bloom), context_length=256), "cpu")
    stock = AutoModelForCausalLM.from_pretrained(tiny_bloom, dtype=torch.float32).eval()
    fused = [m for m in engine.model.modules() if isinstance(m, FusedTanhGelu)]
    assert len(fused) == stock.config.n_layer
    assert not any(type(m).__name__ == "BloomGelu" for m in engine.model.modules())

    prompts = ["请解释什么是人工智能", "The quick brown fox", "北京 上海 长江 天气 公园 🚀", "def f(x):"]
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=24, min_new_tokens=24, repetition_penalty=1.2,
                              pad_token_id=engine.pad_token_id, eos_token_id=engine.eos_token_id)
    for prompt in prompts:
        job = engine.prepare("j", parse_request({"prompt": prompt, "num_beams": 1, "max_new_tokens": 24, "min_new_tokens": 24}))
        (generated,) = engine.generate_batch([job])
        with torch.inference_mode():
            expected = stock.generate(input_ids=torch.tensor([job.input_ids]), generation_config=config)[0, len(job.input_ids):]
        assert generated.result.sequences[0].token_ids == expected.tolist(), prompt
