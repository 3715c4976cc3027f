"""Build a tiny real checkpoint locally: random weights, a real BLOOM or LLaMA architecture, and a
byte-level BPE tokenizer trained here with `tokenizers`. Saved with save_pretrained and loaded back
through the same from_pretrained path as a real model. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3

_CORPUS = [
    "Human: 请解释什么是人工智能\n\nAssistant: 人工智能是计算机科学的一个分支，研究如何让机器像人一样思考和学习。",
    "Human: 写一篇关于环保的短文\n\nAssistant: 保护环境是每个人的责任。我们应该节约用水，减少塑料的使用，多种树。",
    "Human: 解释Transformer架构原理\n\nAssistant: Transformer使用自注意力机制，可以并行处理序列中的所有位置。",
    "Human: 生成一篇关于太空探索的科幻短文\n\nAssistant: 二一五零年，人类的飞船第一次抵达了木星的卫星。",
    "贪婪搜索每次选择概率最高的词，波束搜索同时探索多条候选路径，采样解码基于概率分布随机采样。",
    "温度控制输出的随机性，值越大生成越多样。重复惩罚抑制重复生成，防止特定长度的短语重复出现。",
    "北京是中国的首都。上海是一个国际化的大城市。长江是中国最长的河流。今天天气很好，我们去公园散步吧。",
    "Human: What is machine learning?\n\nAssistant: Machine learning is a way of teaching computers to learn patterns from data.",
    "Human: Translate 'good morning' into Chinese.\n\nAssistant: 早上好。",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "Beam search keeps several candidate sequences; sampling draws the next token from the distribution.",
    "def generate_answer(prompt, max_new_tokens=200): return tokenizer.decode(outputs[0], skip_special_tokens=True)",
    "Emoji and symbols: 🚀 🌍 😀 ✨ — «quotes» “double” ‘single’ 1234567890 +-*/=<>()[]{}",
    "Numbers and dates: 2024-05-01, 3.14159, 100%, $42, ￥88, 第三章第五节。",
]


@dataclass(frozen=True)
class TinyModelSpec:
    arch: Literal["bloom", "llama"] = "bloom"
    vocab_size: int = 1024
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    seed: int = 0
    # Larger than the usual 0.02 so that random weights give varied, not constant, greedy output.
    initializer_range: float = 0.4
    # Median probability of EOS per step, so that sequences sometimes end by themselves (finish_reason
    # eos, min_new_tokens) as a trained model's do; None leaves the random weights alone.
    eos_probability: float | None = 0.02


# The two tiny test models; LLaMA's hidden states are larger, so its EOS needs a lower median to
# end a comparable share of sequences.
TINY_SPECS = {"bloom": TinyModelSpec(), "llama": TinyModelSpec(arch="llama", eos_probability=0.0005)}

# About 50M parameters: the size the throughput benchmark asks for.
BENCHMARK_SPEC = TinyModelSpec(vocab_size=8192, hidden_size=352, layers=30, heads=8, initializer_range=0.02, eos_probability=None)

MARKER = "belle-tiny-model.json"


def train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny_model(path: Path | str, spec: TinyModelSpec = TinyModelSpec(), *, force: bool = False) -> Path:
    """Build the checkpoint at ``path`` unless one with the same spec is already there."""
    path = Path(path)
    marker = path / MARKER
    if not force and marker.is_file() and json.loads(marker.read_text()) == asdict(spec):
        return path

    import torch
    import transformers
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()

    tokenizer = train_tokenizer(spec.vocab_size)
    common = dict(vocab_size=len(tokenizer), hidden_size=spec.hidden_size, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=spec.initializer_range)
    if spec.arch == "bloom":
        config = BloomConfig(n_layer=spec.layers, n_head=spec.heads, **common)
        model_cls = BloomForCausalLM
    else:
        config = LlamaConfig(num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=max(1, spec.heads // 2),
                             intermediate_size=spec.hidden_size * 2, max_position_embeddings=2048, **common)
        model_cls = LlamaForCausalLM
    torch.manual_seed(spec.seed)
    model = model_cls(config).eval()
    if spec.eos_probability is not None:
        calibrate_eos(model, tokenizer, spec.eos_probability)

    # Build beside the target and swap in, so a half-written checkpoint is never picked up.
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps(asdict(spec)))
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def build_tiny_adapter(base: Path | str, path: Path | str, *, seed: int, rank: int = 4, force: bool = False) -> Path:
    """A LoRA adapter for the tiny checkpoint at ``base``, with random (non-zero) weights so that it
    changes the output, saved with peft's save_pretrained as a trained adapter is."""
    path = Path(path)
    marker = path / MARKER
    spec = {"base": str(Path(base).resolve()), "seed": seed, "rank": rank}
    if not force and marker.is_file() and json.loads(marker.read_text()) == spec:
        return path

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(base)
    targets = ["query_key_value"] if model.config.model_type == "bloom" else ["q_proj", "v_proj"]
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=4 * rank, target_modules=targets, task_type="CAUSAL_LM", init_lora_weights=False))
    path.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(path)
    marker.write_text(json.dumps(spec))
    return path


def calibrate_eos(model, tokenizer, target: float) -> None:
    """Point EOS's output row along the mean final hidden state and scale it until the median
    probability of EOS over the corpus is ``target``."""
    import torch

    eos = tokenizer.eos_token_id
    with torch.no_grad():
        batch = [torch.tensor([tokenizer(text)["input_ids"]]) for text in _CORPUS]
        hidden = torch.cat([model(ids, output_hidden_states=True).hidden_states[-1][0] for ids in batch])
        direction = hidden.mean(0) / hidden.mean(0).norm()
        row = model.get_output_embeddings().weight
        lo, hi = 0.0, 50.0
        for _ in range(30):  # bisection on the scale: the median rises with it
            row[eos] = direction * (lo + hi) / 2
            median = torch.cat([model(ids).logits[0].softmax(-1)[:, eos] for ids in batch]).median()
            lo, hi = ((lo + hi) / 2, hi) if median < target else (lo, (lo + hi) / 2)
        row[eos] = direction * (lo + hi) / 2


def parameter_count(path: Path | str) -> int:
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
