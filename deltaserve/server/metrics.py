"""Prometheus metrics: HTTP traffic measured by the server, cache/KV/speculation read from the engine.

Each app gets its own `CollectorRegistry` (several apps may live in one
process, e.g. in tests). Engine-side numbers are not mirrored into
counters as they change: on every scrape the handler fetches
`engine.stats()` on the engine thread (the engine is not thread-safe) and
renders it as metric families, so the scrape is always one consistent
snapshot.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)

# engine.stats() key -> (metric name, help); counters get the `_total` suffix from prometheus_client
_ENGINE_COUNTERS = {
    "requests": ("deltaserve_engine_requests", "Requests admitted by the engine"),
    "prompt_tokens": ("deltaserve_prompt_tokens", "Prompt tokens of finished requests"),
    "cached_tokens": ("deltaserve_cached_tokens", "Prompt tokens whose KV came from the cache"),
    "prefilled_tokens": ("deltaserve_prefilled_tokens", "Prompt tokens computed (prefilled)"),
    "generated_tokens": ("deltaserve_generated_tokens", "Generated tokens"),
    "drafted_tokens": ("deltaserve_spec_drafted_tokens", "Speculative draft tokens verified"),
    "accepted_tokens": ("deltaserve_spec_accepted_tokens", "Speculative draft tokens accepted"),
    "evicted_tokens": ("deltaserve_kv_evicted_tokens", "Cached tokens evicted from the KV pool"),
    "demoted_sessions": ("deltaserve_demoted_sessions", "Session pins dropped under memory pressure"),
    "unpinned_over_budget": ("deltaserve_unpinned_over_budget", "Turns whose session stayed unpinned: pinned KV over its budget"),
    "preemptions": ("deltaserve_preemptions", "Running requests preempted for recompute"),
    "steps": ("deltaserve_engine_steps", "Engine steps run"),
    "prefill_steps": ("deltaserve_engine_prefill_steps", "Engine steps that carried prefill tokens"),
    "time_schedule_s": ("deltaserve_engine_schedule_seconds", "Engine time building steps (scheduling, admission, KV)"),
    "time_forward_prefill_s": ("deltaserve_engine_forward_prefill_seconds",
                               "Engine time in forward passes of steps with prefill tokens"),
    "time_forward_decode_s": ("deltaserve_engine_forward_decode_seconds",
                              "Engine time in forward passes of pure decode/verify steps"),
    "time_sample_s": ("deltaserve_engine_sample_seconds", "Engine time sampling, verifying drafts, bookkeeping"),
}
_ENGINE_GAUGES = {
    "hit_ratio": ("deltaserve_cache_hit_ratio", "cached_tokens / prompt_tokens since start"),
    "acceptance_rate": ("deltaserve_spec_acceptance_rate", "accepted / drafted speculative tokens since start"),
    "sessions": ("deltaserve_sessions", "Known sessions"),
    "pinned_sessions": ("deltaserve_pinned_sessions", "Sessions whose KV is pinned"),
    # a gauge, so no `_total` suffix (Prometheus reserves it for counters); was deltaserve_kv_slots_total
    "kv_slots_total": ("deltaserve_kv_slots", "Token slots in the KV pool"),
    "kv_slots_used": ("deltaserve_kv_slots_used", "Token slots in use (cache + running)"),
    "kv_cached_tokens": ("deltaserve_kv_cached_tokens", "Tokens held by the radix cache"),
    "kv_slot_run_fraction": ("deltaserve_kv_slot_run_fraction",
                             "Pinned sessions' 16-token windows in 16 consecutive slots (one tile load each)"),
    "running": ("deltaserve_running_requests", "Requests running"),
    "waiting": ("deltaserve_waiting_requests", "Requests waiting for admission"),
}


class _EngineSnapshot:
    """A one-shot collector over a stats dict (what `generate_latest` needs: `collect()`)."""

    def __init__(self, stats: dict[str, Any]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        for key, (name, doc) in _ENGINE_COUNTERS.items():
            if key in s:
                yield CounterMetricFamily(name, doc, value=float(s[key]))
        for key, (name, doc) in _ENGINE_GAUGES.items():
            if key in s:
                yield GaugeMetricFamily(name, doc, value=float(s[key]))
        if s.get("kv_slots_total"):
            yield GaugeMetricFamily("deltaserve_kv_usage_ratio", "Fraction of KV slots in use",
                                    value=s.get("kv_slots_used", 0) / s["kv_slots_total"])
        if "cache_mode" in s:
            yield _info("deltaserve_cache_mode_info", str(s["cache_mode"]))


def _info(name: str, mode: str) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, "Cache mode (label)", labels=["mode"])
    g.add_metric([mode], 1.0)
    return g


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("deltaserve_http_requests", "HTTP requests by route template and status",
                                     ["route", "method", "status"], registry=r)
        self.latency = Histogram("deltaserve_request_latency_seconds",
                                 "End-to-end latency of generation requests (until the last token)",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("deltaserve_time_to_first_token_seconds", "Time to the first generated token",
                              ["route"], buckets=_TTFT_BUCKETS, registry=r)
        self.queue_time = Histogram("deltaserve_request_queue_time_seconds",
                                    "Time a request waited for admission to the running set", ["route"],
                                    buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram("deltaserve_inter_token_latency_seconds",
                                     "Time between generated tokens (a step's gap shared by its tokens)", ["route"],
                                     buckets=_ITL_BUCKETS, registry=r)
        self.request_prompt_tokens = Counter("deltaserve_request_prompt_tokens",
                                             "Prompt tokens of completed HTTP generations", ["route"], registry=r)
        self.request_cached_tokens = Counter("deltaserve_request_cached_tokens",
                                             "Cached prompt tokens of completed HTTP generations", ["route"],
                                             registry=r)
        self.render_seconds = Counter("deltaserve_prompt_render_seconds",
                                      "Time turning chat requests into prompt tokens (template, tokenizer)",
                                      ["route"], registry=r)
        self.request_completion_tokens = Counter("deltaserve_request_completion_tokens",
                                                 "Completion tokens of completed HTTP generations", ["route"],
                                                 registry=r)

    def observe_generation(self, route: str, e2e: float, ttft: float | None, prompt_tokens: int,
                           cached_tokens: int, completion_tokens: int, queue_s: float | None = None) -> None:
        self.latency.labels(route).observe(e2e)
        if queue_s is not None:
            self.queue_time.labels(route).observe(queue_s)
        if ttft is not None:
            self.ttft.labels(route).observe(ttft)
        self.request_prompt_tokens.labels(route).inc(prompt_tokens)
        self.request_cached_tokens.labels(route).inc(cached_tokens)
        self.request_completion_tokens.labels(route).inc(completion_tokens)

    def observe_tokens(self, route: str, gap: float, n: int) -> None:
        """`n` tokens arrived `gap` seconds after the previous ones (one step; speculation may bring several)."""
        h = self.inter_token.labels(route)
        for _ in range(n):
            h.observe(gap / n)

    def render(self, engine_stats: dict[str, Any]) -> bytes:
        return generate_latest(self.registry) + generate_latest(_EngineSnapshot(engine_stats))  # type: ignore[arg-type]


class RequestCounterMiddleware:
    """Pure ASGI middleware counting responses by route *template* (no session ids in labels).

    Pure ASGI rather than BaseHTTPMiddleware so streaming responses and
    client disconnects pass through untouched.
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def _send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http_requests.labels(route, scope.get("method", ""), str(status[0])).inc()
