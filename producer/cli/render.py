"""Human-readable and JSON output of job records, shared by the CLI and the demo."""

from __future__ import annotations

import json

from producer.records import JobRecord


def record_json(record: JobRecord) -> str:
    return json.dumps(record.model_dump(mode="json"), ensure_ascii=False)


def record_text(record: JobRecord, *, max_chars: int | None = None) -> str:
    lines = [f"job {record.job_id}: {record.state.value} (attempts {record.attempts}, worker {record.worker or '-'})"]
    if record.result is not None:
        r = record.result
        t = r.timings
        lines.append(
            f"  model {r.model}; {r.usage.prompt_tokens} prompt + {r.usage.completion_tokens} completion tokens; "
            f"queued {t.queued_s * 1000:.0f} ms, generated in {t.generation_s * 1000:.0f} ms in a batch of {t.batch_size}"
        )
        if r.prompt_fit.messages_dropped or r.prompt_fit.max_new_tokens_clamped_to:
            lines.append(f"  fitted to {r.prompt_fit.context_length} tokens: dropped {r.prompt_fit.messages_dropped} messages, "
                         f"max_new_tokens clamped to {r.prompt_fit.max_new_tokens_clamped_to}")
        for s in r.sequences:
            text = s.text if max_chars is None or len(s.text) <= max_chars else s.text[:max_chars] + "…"
            score = f", score {s.score:.3f}" if s.score is not None else ""
            lines.append(f"  [{s.index}] ({s.finish_reason.value}{score}) {text!r}")
    if record.error is not None:
        lines.append(f"  error {record.error.code.value}: {record.error.message}")
    return "\n".join(lines)
