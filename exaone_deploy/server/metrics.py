"""Prometheus metrics of a server: HTTP requests (counted by the ASGI gate), per-request latencies and token
counts (from the scheduler's :class:`~exaone_deploy.runtime.scheduler.SchedulerObserver` hooks, on its thread),
and queue / slot gauges read from the engine's stats when scraped.

Every :class:`Metrics` has a registry of its own (several servers can live in one process, e.g. in tests);
rejected: prometheus_client's global registry, which raises on the second server's duplicate names.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..runtime.scheduler import Request, SchedulerObserver

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics(SchedulerObserver):
    """Prometheus metrics, in a registry of their own."""

    ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "exaone_http_requests", "HTTP requests by endpoint and status code", ["endpoint", "code"], registry=r
        )
        self.finished = Counter("exaone_requests_finished", "Generations finished, by reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("exaone_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("exaone_generation_tokens", "Tokens generated", registry=r)
        self.queue_time = Histogram(
            "exaone_queue_time_seconds", "Time from submission to a cache slot", buckets=_LATENCY, registry=r
        )
        self.ttft = Histogram(
            "exaone_time_to_first_token_seconds",
            "Time from submission to the first token",
            buckets=_LATENCY,
            registry=r,
        )
        self.latency = Histogram(
            "exaone_request_latency_seconds", "Time from submission to the last token", buckets=_LATENCY, registry=r
        )
        self.tpot = Histogram(
            "exaone_time_per_output_token_seconds", "Decode time per token after the first", buckets=_STEP, registry=r
        )
        self.decode_step = Histogram(
            "exaone_decode_step_seconds", "Duration of one batched decode step", buckets=(*_STEP, 5), registry=r
        )
        self.decode_rows = Counter(
            "exaone_decode_rows",
            "Cache rows computed by decode steps (the slot span: rows beyond the tokens decoded are idle)",
            registry=r,
        )
        self.batch_size = Histogram(
            "exaone_decode_batch_size", "Requests in one decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.prefill_time = Histogram(
            "exaone_prefill_chunk_seconds", "Duration of one prefill chunk", buckets=_LATENCY, registry=r
        )
        self.queue_depth = Gauge("exaone_queue_depth", "Requests waiting for a cache slot", registry=r)
        self.running = Gauge("exaone_running_requests", "Requests holding a cache slot", registry=r)
        self.slots_used = Gauge("exaone_cache_slots_used", "KV-cache slots in use", registry=r)
        self.slots_total = Gauge("exaone_cache_slots_total", "KV-cache slots", registry=r)
        # prefix cache (scheduler docstring): lookups, hits, prompt tokens taken from the cache, token hit rate
        self.prefix_lookups = Counter(
            "exaone_prefix_cache_queries", "Admissions that looked up the prefix cache", registry=r
        )
        self.prefix_hits = Counter("exaone_prefix_cache_hits", "Admissions that reused a cached prefix", registry=r)
        self.prefix_reused = Counter(
            "exaone_prefix_cache_reused_tokens",
            "Prompt tokens taken from the prefix cache instead of prefilled",
            registry=r,
        )
        self.prefix_prompt = Counter(
            "exaone_prefix_cache_prompt_tokens", "Prompt tokens of those admissions", registry=r
        )
        self.prefix_hit_rate = Gauge(
            "exaone_prefix_cache_hit_rate", "Reused / prompt tokens of admissions so far", registry=r
        )
        self.prefix_hit_rate.set_function(
            lambda: self.prefix_reused._value.get() / max(1.0, self.prefix_prompt._value.get())
        )

    def bind(self, stats: Callable[[], dict], slots_total: int) -> None:
        """Read the gauges from ``stats()`` (the scheduler's, with ``queue_depth``, ``running``, ``slots_used``)
        at scrape time."""
        self.queue_depth.set_function(lambda: stats()["queue_depth"])
        self.running.set_function(lambda: stats()["running"])
        self.slots_used.set_function(lambda: stats()["slots_used"])
        self.slots_total.set(slots_total)

    def endpoint(self, path: str) -> str:
        return path if path in self.ENDPOINTS else "other"

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # scheduler hooks (scheduler thread)
    def on_admit(self, req: Request) -> None:
        self.queue_time.observe(req.t_admit - req.t_submit)
        self.prompt_tokens.inc(len(req.prompt_ids))

    def on_first_token(self, req: Request) -> None:
        self.ttft.observe(req.t_first - req.t_submit)

    def on_finish(self, req: Request) -> None:
        self.finished.labels(req.finish_reason or "unknown").inc()
        n = req.completion_tokens
        self.generation_tokens.inc(n)
        if req.finish_reason in ("stop", "length"):
            self.latency.observe(req.t_done - req.t_submit)
            if n > 1:
                self.tpot.observe((req.t_done - req.t_first) / (n - 1))

    def on_prefill(self, tokens: int, seconds: float) -> None:
        self.prefill_time.observe(seconds)

    def on_prefix(self, req: Request) -> None:
        self.prefix_lookups.inc()
        self.prefix_prompt.inc(len(req.prompt_ids))
        if req.reused:
            self.prefix_hits.inc()
            self.prefix_reused.inc(req.reused)

    def on_decode(self, batch: int, seconds: float, rows: int) -> None:
        self.decode_step.observe(seconds)
        self.batch_size.observe(batch)
        self.decode_rows.inc(rows)
