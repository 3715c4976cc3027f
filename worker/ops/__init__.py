"""The worker-side commands of `belle-queue` (worker, demo, tiny-model, prepare-model), the multi-process
supervisor, the demo and the tiny checkpoints."""
