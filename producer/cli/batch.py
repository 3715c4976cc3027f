"""`belle-queue batch submit | status | results | cancel`: overnight batches from JSONL files."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from producer.cli.common import EXIT_OK, open_output, parse_set
from producer.cli.common import EXIT_TIMEOUT as EXIT_NOT_FINISHED


def cmd_submit(args: argparse.Namespace, client) -> int:
    from producer.batches import parse_duration

    defaults = parse_set(args.set or [])
    if args.preset:
        defaults["preset"] = args.preset
    window = parse_duration(args.completion_window) if args.completion_window else None
    submission = client.submit_batch(Path(args.file), defaults=defaults, batch_id=args.batch_id, new=args.new, completion_window_s=window,
                                     skip_invalid=args.skip_invalid, progress=args.progress)
    if submission.refused:
        refusals = args.refusals or str(refusals_path(Path(args.file)))
        with open_output(refusals, "--refusals") as f:
            f.writelines(e.to_json() + "\n" for e in submission.refused)
        print(f"{len(submission.refused)} invalid lines skipped; their errors are in {refusals}", file=sys.stderr)
    resumed = submission.total - submission.created
    note = (" (all were already in: nothing enqueued)" if not submission.created else f" ({resumed} were already in: batch resumed)") if resumed else ""
    print(f"batch {submission.batch_id}: {submission.total} jobs submitted{note}", file=sys.stderr)
    if args.json:
        print(json.dumps({"batch_id": submission.batch_id, "total": submission.total, "created": submission.created,
                          "refused": len(submission.refused), "deadline": submission.deadline}))
    else:
        print(submission.batch_id)
    return EXIT_OK


def refusals_path(source: Path) -> Path:
    """Where --skip-invalid writes refused lines by default: next to the input, bad.jsonl → bad.refused.jsonl."""
    return source.with_name(f"{source.stem}.refused.jsonl")


def cmd_status(args: argparse.Namespace, client) -> int:
    from producer.batches import COUNTED

    status = client.batch_status(args.batch_id)
    if args.json:
        print(status.model_dump_json())
        return EXIT_OK
    eta = f", ETA {status.eta_s:,.0f} s" if status.eta_s is not None and not status.finished else ""
    rate = f"; {status.rate:,.2f} jobs/s" if status.rate else ""
    print(f"batch {status.batch_id} ({status.source or '-'}): {status.state}, {status.done}/{status.total} done{rate}{eta}")
    print("  " + ", ".join(f"{name} {getattr(status, name)}" for name in COUNTED)
          + (f"; {status.refused} lines refused at submission" if status.refused else ""))
    if status.deadline:
        print(f"  deadline {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(status.deadline))}: jobs not started by then expire")
    return EXIT_OK


def cmd_results(args: argparse.Namespace, client) -> int:
    from producer.batches import result_line
    from producer.progress import Progress

    status = client.batch_status(args.batch_id)
    out = sys.stdout if args.output == "-" else open_output(args.output, "--output")
    bar = Progress(status.total, f"results {args.batch_id[:12]}", enabled=None if args.output != "-" else False)
    unfinished: dict[str, int] = {}
    unavailable = 0
    written = 0
    try:
        for job_id, fields in client.batches.results(args.batch_id):
            line = result_line(job_id, fields)
            if line["state"] in ("queued", "running"):
                unfinished[line["state"]] = unfinished.get(line["state"], 0) + 1
            unavailable += line["state"] == "unavailable"
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            written += 1
            bar.update()
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    where = "" if args.output == "-" else f" to {args.output}"
    if unfinished:
        print(f"wrote {written} lines{where}; {sum(unfinished.values())} jobs not finished yet ("
              + ", ".join(f"{n} {s}" for s, n in unfinished.items()) + "): their lines say so; run this again later for their results", file=sys.stderr)
        return EXIT_NOT_FINISHED
    gone = f" ({unavailable} of them 'unavailable': their records expired with their results)" if unavailable else ""
    print(f"wrote {written} lines{where}; every job has ended{gone}", file=sys.stderr)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, client) -> int:
    outcomes = client.cancel_batch(args.batch_id)
    if args.json:
        print(json.dumps({"batch_id": args.batch_id, **outcomes.model_dump()}))
    else:
        gone = f", {outcomes.missing} had expired records" if outcomes.missing else ""
        print(f"batch {args.batch_id}: {outcomes.cancelled} queued jobs cancelled, {outcomes.requested_held} held by a worker end cancelled "
              f"without running, {outcomes.requested} running ones stop at their next step, {outcomes.ended} had ended already{gone}")
    return EXIT_OK


def register(sub, with_client) -> None:
    batch = sub.add_parser("batch", help="overnight batches: submit a JSONL file, follow it, collect its results")
    commands = batch.add_subparsers(dest="batch_command", required=True, metavar="BATCH_COMMAND")

    p = commands.add_parser("submit", help="check every line of a JSONL file, then enqueue them to the bulk queue; prints the batch id")
    p.add_argument("file", help="JSONL: one request per line (plain, or OpenAI batch lines)")
    p.add_argument("--preset", help="named parameter set for every line (a line's own fields win)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a request field for every line (repeatable)")
    p.add_argument("--skip-invalid", action="store_true", help="submit the valid lines; write the invalid ones' errors to --refusals")
    p.add_argument("--refusals", metavar="PATH", help="where --skip-invalid writes the refused lines (default: next to FILE, bad.jsonl → bad.refused.jsonl)")
    p.add_argument("--completion-window", metavar="DURATION", help="jobs not started within this (e.g. 24h, 90m) end expired")
    p.add_argument("--batch-id", help="the batch's id (default: derived from the file and options, so a resubmission resumes it)")
    p.add_argument("--new", action="store_true", help="a new batch even if the same file was submitted before")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar on stderr (default: on a terminal)")
    p.add_argument("--json", action="store_true", help="print the submission as JSON")
    p.set_defaults(func=with_client(cmd_submit))

    p = commands.add_parser("status", help="counts by state, rate and ETA")
    p.add_argument("batch_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=with_client(cmd_status))

    p = commands.add_parser("results", help="one line per job in input order: custom_id, and the result or the error (or the state, if not ended)")
    p.add_argument("batch_id")
    p.add_argument("-o", "--output", default="-", metavar="PATH", help="file to write (default: stdout)")
    p.set_defaults(func=with_client(cmd_results))

    p = commands.add_parser("cancel", help="cancel the batch's jobs that have not ended")
    p.add_argument("batch_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=with_client(cmd_cancel))
