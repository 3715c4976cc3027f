"""The `belle-queue` command's parser and its client commands (the ``batch`` ones: producer/cli/batch.py).
Worker-side commands (worker, demo, tiny-model) are registered by the worker package through the
`belle_queue.commands` entry point and import the GPU stack only when they run.

Exit codes: 0 success, 1 job failed (or cancelled/expired, or not found), 2 invalid request (or
command line), 3 timed out / not finished, 4 Redis unreachable, refused us, or refuses writes; 141 (as ``cat`` killed
by SIGPIPE) when the reader of our output went away early (``| head``), silently. Every error is one line
on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import entry_points

from producer.cli import batch, monitoring
from producer.cli.common import (EXIT_FAILED, EXIT_INVALID, EXIT_OK, EXIT_OUTPUT_CLOSED, EXIT_REDIS, EXIT_TIMEOUT, memory_size, parse_set,
                                 read_json_file, seconds)


def _settings(args: argparse.Namespace):
    from pydantic import ValidationError

    from producer.errors import InvalidRequestError
    from producer.settings import Settings, get_settings

    try:
        return Settings(redis_url=args.redis_url) if args.redis_url else get_settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        name = "BELLE_" + "_".join(str(part) for part in error["loc"]).upper()
        raise InvalidRequestError.single(name, None, f"setting {name}: {error['msg']}; fix the environment (or BELLE_SETTINGS_FILE)") from None


def _client(args: argparse.Namespace):
    from producer.client import JobClient

    return JobClient(_settings(args))


def _exit_for(record) -> int:
    return _exit_for_state(record.state) if record.is_final else EXIT_TIMEOUT


def _print_record(record, as_json: bool) -> None:
    from producer.cli.render import record_json, record_text

    print(record_json(record) if as_json else record_text(record))


def cmd_submit(args: argparse.Namespace) -> int:
    from producer import keys

    request = parse_set(args.set or [])
    if args.prompt is not None:
        request["prompt"] = args.prompt
    if args.messages is not None:
        request["messages"] = read_json_file(args.messages, "--messages")
    if args.response_format is not None:
        request["response_format"] = read_json_file(args.response_format, "--response-format")
    if args.preset:
        request["preset"] = args.preset
    if args.stream:
        request["stream"] = True
    queue = keys.QUEUE_NAMES[args.queue]
    with _client(args) as client:
        job_id = client.submit(request, queue=queue, check_workers=args.check_workers)
        if args.stream:
            print(job_id, file=sys.stderr)
            return _watch(client, job_id, args.wait if args.wait is not None else args.timeout, args.json)
        if args.wait is None:
            print(json.dumps({"job_id": job_id}) if args.json else job_id)
            return EXIT_OK
        if not args.json:
            print(job_id, file=sys.stderr)
        return _wait_and_print(client, job_id, args.wait, args.json)


def _wait_and_print(client, job_id: str, timeout: float, as_json: bool) -> int:
    """Print the final record, or on timeout the record as it stands (and say so on stderr)."""
    from producer.errors import JobTimeoutError

    try:
        record = client.wait(job_id, timeout)
    except JobTimeoutError as exc:
        print(f"timed out: {exc}", file=sys.stderr)
        record = client.get(job_id)
    _print_record(record, as_json)
    return _exit_for(record)


def _watch(client, job_id: str, timeout: float, as_json: bool) -> int:
    """Print a job's text as it arrives (with --json, one event per line); the exit code follows its end."""
    from producer.records import JobState, StreamChunk

    attempt = None
    for event in client.stream(job_id, timeout):
        if as_json:
            print(event.model_dump_json(), flush=True)
            if not isinstance(event, StreamChunk):
                return _exit_for_state(event.state)
            continue
        if isinstance(event, StreamChunk):
            if attempt is not None and event.attempt != attempt:
                print(f"\n[the worker was lost; attempt {event.attempt} starts the text again]", file=sys.stderr)
            attempt = event.attempt
            prefix = f"\n[{event.index}] " if event.index else ""
            sys.stdout.write(prefix + event.text)
            sys.stdout.flush()
            continue
        sys.stdout.write("\n")
        reasons = ",".join(event.finish_reasons)
        if event.state is not JobState.SUCCEEDED or event.error is not None:
            detail = f": {event.error.code}: {event.error.message}" if event.error else ""
            print(f"[{event.state}{detail}{' (' + reasons + ')' if reasons else ''}]", file=sys.stderr)
        return _exit_for_state(event.state)
    return EXIT_TIMEOUT


def _exit_for_state(state) -> int:
    from producer.records import JobState

    return EXIT_OK if state is JobState.SUCCEEDED else EXIT_FAILED


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _watch(client, args.job_id, args.timeout, args.json)


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        outcome = client.cancel(args.job_id)
    print(json.dumps({"job_id": args.job_id, "outcome": outcome.outcome}) if args.json else f"{args.job_id}: {outcome.description}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        record = client.get(args.job_id)
    if args.json:
        _print_record(record, True)
    else:
        print(record.state.value)
    return EXIT_OK


def cmd_result(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.wait is not None:
            return _wait_and_print(client, args.job_id, args.wait, args.json)
        record = client.get(args.job_id)
    _print_record(record, args.json)
    return _exit_for(record)


def cmd_workers(args: argparse.Namespace) -> int:
    import time

    with _client(args) as client:
        workers = client.workers()
    if args.json:
        print(json.dumps([w.model_dump(mode="json") for w in workers], ensure_ascii=False))
        return EXIT_OK
    if not workers:
        print("no live workers")
    now = time.time()
    for w in workers:
        caps = f"max_new_tokens ≤{w.max_new_tokens}, beams ≤{w.num_beams}" if w.profile else "no caps"
        full = (f"; REDIS REFUSES ITS WRITES (out of memory) for {now - w.redis_refusing_writes_since:.0f} s: it takes no new job"
                if w.redis_refusing_writes_since else "")
        print(f"{w.name}: {w.model} on {w.device}; adapters: {', '.join(w.adapters) or 'none'}; profile {w.profile or 'none'} ({caps}); "
              f"queues {','.join(w.queues)}; up {now - w.started_at:.0f} s, last heartbeat {now - w.heartbeat_at:.1f} s ago; pid {w.pid} on {w.host}; "
              f"v{w.version}{full}")
    return EXIT_OK


def cmd_presets(args: argparse.Namespace) -> int:
    from producer.presets import describe_presets, load_presets

    settings = _settings(args)
    descriptions = describe_presets(settings)
    for name, params in load_presets(settings).items():
        print(f"{name}: {descriptions.get(name, '')}\n    {json.dumps(params)}")
    return EXIT_OK


def cmd_settings(args: argparse.Namespace) -> int:
    import os

    from producer.settings import shown_settings

    settings = _settings(args)
    shown = shown_settings(settings)
    if args.json:
        print(json.dumps(shown, ensure_ascii=False))
        return EXIT_OK
    in_environment = {name.upper() for name in os.environ}
    for name, value in shown.items():
        variable = f"BELLE_{name.upper()}"
        if name == "redis_url" and args.redis_url:
            source = "--redis-url"
        elif variable in in_environment:
            source = "environment"
        elif name in settings.model_fields_set:
            source = "settings file"
        else:
            source = "default"
        text = value if isinstance(value, str) else "none" if value is None else json.dumps(value)
        print(f"{variable}={text}  ({source})")
    return EXIT_OK


def _with_client(command):
    """A command that gets a JobClient made from the command line's Redis URL."""

    def run(args: argparse.Namespace) -> int:
        with _client(args) as client:
            return command(args, client)

    return run


def cmd_redis(args: argparse.Namespace) -> int:
    import signal

    from producer.embedded_redis import EmbeddedRedis

    data_dir = args.dir or (None if args.ephemeral else _settings(args).redis_data_dir)
    server = EmbeddedRedis(port=args.port, data_dir=data_dir, ephemeral=args.ephemeral, maxmemory=args.maxmemory)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(EXIT_OK))
    server.start()
    print(server.url, flush=True)
    print(f"redis-server on port {server.port}: {server.description}", file=sys.stderr, flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return EXIT_OK


def cmd_gateway(args: argparse.Namespace) -> int:
    import logging
    import os

    try:
        import uvicorn
    except ImportError:
        print("error: the gateway needs the gateway extra: pip install 'belle-queue[gateway]'", file=sys.stderr)
        return EXIT_FAILED
    settings = _settings(args)
    if args.redis_url:  # (uvicorn's worker processes read their settings from the environment)
        os.environ["BELLE_REDIS_URL"] = args.redis_url
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run("producer.gateway.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=settings.log_level.lower(), proxy_headers=True)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="belle-queue", description="Job-queue inference for BELLE-family chat models.")
    parser.add_argument("--redis-url", help="Redis URL (default: BELLE_REDIS_URL, else redis://localhost:6379/0)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", help="validate and enqueue a job; prints its id (with --wait, the final record)")
    p.add_argument("--prompt", help="the user's prompt")
    p.add_argument("--messages", metavar="FILE", help="JSON file with a list of {role, content} messages instead of --prompt")
    p.add_argument("--preset", help="named parameter set (see `belle-queue presets`)")
    p.add_argument("--response-format", metavar="FILE", help='JSON file with a response_format, e.g. {"type": "json_schema", "json_schema": {"name": …, "schema": …}}')
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a request field; VALUE is JSON or a bare string (repeatable)")
    p.add_argument("--wait", type=seconds, metavar="SECONDS", help="wait this long for the final record")
    p.add_argument("--stream", action="store_true", help="stream=true, and print the text as it is generated (as `watch`)")
    p.add_argument("--timeout", type=seconds, default=600, metavar="SECONDS", help="with --stream: how long to follow the job (default 600)")
    p.add_argument("--check-workers", action="store_true", help="refuse the job unless a live worker serves its adapter and allows its size")
    p.add_argument("--queue", choices=("interactive", "bulk"), default="interactive",  # (keys.QUEUE_NAMES: not imported to build the parser)
                   help="interactive (default; workers take it first) or bulk (behind interactive jobs, as batches)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("watch", help="print a job's text as it is generated, from the start even if joined late")
    p.add_argument("job_id")
    p.add_argument("--timeout", type=seconds, default=600, metavar="SECONDS", help="how long to follow the job (default 600)")
    p.add_argument("--json", action="store_true", help="print each chunk and the end event as a JSON line")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("cancel", help="cancel a job: queued ones never run, running ones stop at the next token")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("status", help="print a job's state")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="print the whole record as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("result", help="print a job's result or error")
    p.add_argument("job_id")
    p.add_argument("--wait", type=seconds, metavar="SECONDS", help="wait this long for the job to finish")
    p.add_argument("--json", action="store_true", help="print the whole record as JSON")
    p.set_defaults(func=cmd_result)

    p = sub.add_parser("workers", help="list the live workers: model, adapters, hardware profile, device")
    p.add_argument("--json", action="store_true", help="print them as a JSON list")
    p.set_defaults(func=cmd_workers)

    p = sub.add_parser("presets", help="list the named parameter sets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("settings", help="print the effective settings (environment, settings file, defaults), secrets masked")
    p.add_argument("--json", action="store_true", help="print them as one JSON object")
    p.set_defaults(func=cmd_settings)

    batch.register(sub, _with_client)
    monitoring.register(sub, _settings)

    p = sub.add_parser("gateway", help="serve the HTTP gateway: OpenAI's API, the job API, Batch files, webhooks (needs the gateway extra)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=int, default=1, help="gateway processes (uvicorn workers; default 1)")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("redis", help="run an embedded redis-server in the foreground and print its URL (AOF everysec, no eviction)")
    p.add_argument("--port", type=int, help="port (default: a free one)")
    p.add_argument("--dir", help="data folder, created if absent (default: BELLE_REDIS_DATA_DIR; with --ephemeral, a temporary one)")
    p.add_argument("--maxmemory", type=memory_size, metavar="SIZE", help="memory limit, e.g. 2gb or 512mb; at it, writes are refused, "
                   "nothing is evicted (default: no limit)")
    p.add_argument("--ephemeral", action="store_true", help="keep nothing on disk: no append-only file, no snapshots (demos, tests)")
    p.set_defaults(func=cmd_redis)

    for entry in entry_points(group="belle_queue.commands"):
        entry.load()(sub)
    for command in sub.choices.values():  # also accepted after the command name
        command.add_argument("--redis-url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:  # the reader of our output went away (`belle-queue … | head`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (what is still buffered goes nowhere at exit, instead of a second error)
        return EXIT_OUTPUT_CLOSED


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    import redis

    from producer.batches import BatchInterruptedError
    from producer.errors import BelleError, InvalidRequestError, JobNotFoundError, JobTimeoutError

    try:
        code = args.func(args)
        sys.stdout.flush()  # (a reader that went away shows here, not at exit)
        return code
    except InvalidRequestError as exc:
        print(f"invalid request: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except JobTimeoutError as exc:
        print(f"timed out: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except JobNotFoundError as exc:
        print(f"not found: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BatchInterruptedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REDIS
    except redis.RedisError as exc:
        from producer.connection import describe_error

        print(describe_error(exc, _redis_url(args)), file=sys.stderr)
        return EXIT_REDIS
    except BelleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        raise  # (main's)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: still one line, never a traceback
        print(f"error: unexpected {type(exc).__name__}: {str(exc)[:300]} (this is a bug in belle-queue; please report it with the command)",
              file=sys.stderr)
        return EXIT_FAILED


def _redis_url(args: argparse.Namespace) -> str:
    return args.redis_url or _settings(args).redis_url
