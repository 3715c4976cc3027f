"""The resident model and everything that computes on it: the engine, the continuous decoding batch, its KV arena,
per-row logits processing, incremental detokenising, prompt fitting, fused ops, model configs and hardware
profiles. Never imports ``worker.serving``."""
