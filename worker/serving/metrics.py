"""Prometheus metrics of one worker process, served at ``http://BELLE_METRICS_HOST:BELLE_METRICS_PORT/metrics``
when the port is set (a supervisor gives its children consecutive ports from it; the host defaults to
127.0.0.1, 0.0.0.0 for every interface). Tokens/s is ``rate(belle_generated_tokens_total[1m])``. The whole
fleet's queue depths and job counts come from producer/fleet_metrics.py (gateway, ``belle-queue exporter``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200)  # hops of a bulk job wait hours
TOKEN_GAP = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)  # decoding steps take ms to 100s of ms
SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.jobs = Counter("belle_jobs", "Jobs that ended here, by final state and error code", ["state", "error"], registry=r)
        self.tokens = Counter("belle_generated_tokens", "Tokens generated (every returned sequence's, EOS included)", registry=r)
        self.steps = Counter("belle_decoding_steps", "Steps of the decoding batch", registry=r)
        self.step_rows = Histogram("belle_decoding_step_rows", "Rows (returned sequences) decoded per step", buckets=SIZES, registry=r)
        self.joined = Histogram("belle_join_jobs", "Jobs that joined the decoding batch at once", buckets=SIZES, registry=r)
        self.generate_jobs = Histogram("belle_generate_call_jobs", "Jobs per generate() call (beam sampling)", buckets=SIZES, registry=r)
        self.out_of_memory = Counter("belle_out_of_memory", "Out-of-memory errors caught, by where (join, step, generate)", ["where"], registry=r)
        self.time_to_first_token = Histogram("belle_time_to_first_token_seconds", "Submission to a job's first token (decoding batch jobs)",
                                             buckets=LATENCY, registry=r)
        self.time_between_tokens = Histogram("belle_time_between_tokens_seconds", "Mean time between a job's tokens after its first "
                                             "(decoding batch jobs of two tokens or more): its decoding time after the first token / (tokens - 1)",
                                             buckets=TOKEN_GAP, registry=r)
        self.hop = Histogram("belle_hop_seconds", "Each hop of a job's way: queued (submission to its start), admission (start to joining the batch), "
                             "first_token (joining to its first token), generation (joining to its end), record (its end to its final record written)",
                             ["hop"], buckets=LATENCY, registry=r)
        self.decoding_jobs = Gauge("belle_decoding_jobs", "Jobs in the decoding batch", registry=r)
        self.waiting_jobs = Gauge("belle_waiting_jobs", "Jobs held by the worker, waiting for the batcher", registry=r)
        self.token_budget = Gauge("belle_token_budget", "The remembered token budget (lowered on OOM, grows back)", registry=r)
        self.redis_refusing_writes = Gauge("belle_redis_refusing_writes", "1 while Redis refuses this worker's writes (out of memory), else 0", registry=r)
        self.redis_refused_writes = Counter("belle_redis_refused_writes", "Writes Redis refused for lack of memory, by what the worker was doing",
                                            ["doing"], registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Serve them at http://HOST:PORT/metrics (a thread)."""
        start_http_server(port, addr=host, registry=self.registry)

    def observe_time_between_tokens(self, after_first_s: float, tokens: int) -> None:
        """A job that decoded ``tokens`` tokens (its longest row) in ``after_first_s`` after its first one."""
        if tokens >= 2:
            self.time_between_tokens.observe(after_first_s / (tokens - 1))

    def observe_hops(self, timings, record_s: float) -> None:
        """A finished job's hops (its result's Timings) and the time its final record took to write."""
        self.hop.labels("queued").observe(timings.queued_s)
        if timings.admission_s is not None:
            self.hop.labels("admission").observe(timings.admission_s)
        if timings.first_token_s is not None:
            self.hop.labels("first_token").observe(timings.first_token_s)
            self.time_to_first_token.observe(timings.queued_s + (timings.admission_s or 0.0) + timings.first_token_s)
        self.hop.labels("generation").observe(timings.generation_s)
        self.hop.labels("record").observe(record_s)
