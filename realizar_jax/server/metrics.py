"""Prometheus metrics of one app, in its own CollectorRegistry (several apps in one process do not
collide). The three gauges are the ones the Kubernetes Gateway API Inference Extension's model-server
protocol scrapes (vLLM's names under our prefix); they read engine.metrics() at scrape time, as do
the paged cache's page gauges, its prefix-cache and preemption counters and the scheduler thread's
time by phase (the engine counts them)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# vLLM's buckets: TTFT and inter-token latency span sub-millisecond GPU steps to queued CPU requests.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class _CacheCollector:
    """The KV pages and the engine's own counters, read at scrape time (an engine without a paged
    cache reports zeros)."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []

    def collect(self):
        m = self.engine.metrics()
        get = lambda f: float(getattr(m, f, 0) or 0)   # noqa: E731
        for name, doc, field in [("realizar:kv_cache_pages_total", "KV-cache pages of the pool", "pages_total"),
                                 ("realizar:kv_cache_pages_in_use", "KV-cache pages held by requests", "pages_in_use"),
                                 ("realizar:kv_cache_pages_cached", "Full KV pages in the prefix cache", "pages_cached"),
                                 ("realizar:prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / "
                                  "prompt tokens looked up, since start", "prefix_cache_hit_rate")]:
            yield GaugeMetricFamily(name, doc, value=get(field))
        for name, doc, field in [("realizar:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  "prefix_cache_queries"),
                                 ("realizar:prefix_cache_hits", "Prompt tokens found in the prefix cache (not "
                                  "prefilled)", "prefix_cache_hits"),
                                 ("realizar:prefill_tokens", "Prompt tokens prefilled", "prefill_tokens"),
                                 ("realizar:num_preemptions", "Requests preempted for lack of KV pages (then "
                                  "recomputed)", "preemptions")]:
            yield CounterMetricFamily(name, doc, value=get(field))
        phases = CounterMetricFamily("realizar:engine_seconds", "The scheduler thread's wall time by phase: host "
                                     "(dispatch, bookkeeping), device_wait (blocked reading results), idle, "
                                     "compile (a shape warm-up did not compile)", labels=["phase"])
        for phase, field in (("host", "host_seconds"), ("device_wait", "device_wait_seconds"),
                             ("idle", "idle_seconds"), ("compile", "compile_seconds_in_loop")):
            phases.add_metric([phase], get(field))
        yield phases


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        for name, doc, field in [("realizar:num_requests_waiting", "Requests waiting for a slot", "waiting"),
                                 ("realizar:num_requests_running", "Requests holding a slot", "running"),
                                 ("realizar:kv_cache_usage_perc", "KV cache usage, 0..1 (1 = full)",
                                  "kv_cache_usage")]:
            Gauge(name, doc, registry=r).set_function(lambda f=field: float(getattr(engine.metrics(), f)))
        r.register(_CacheCollector(engine))
        self.ttft = Histogram("realizar:time_to_first_token_seconds", "Submit to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("realizar:inter_token_latency_seconds",
                             "Mean time between tokens of one request (one observation per request)",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("realizar:e2e_request_latency_seconds", "Submit to last token",
                             buckets=E2E_BUCKETS, registry=r)
        # where a request's time goes, as vLLM splits it: waiting for a slot (or pages, or the prefill
        # budget), admitted to first token (prefill), first to last token
        self.queue_time = Histogram("realizar:request_queue_time_seconds", "Submit to admitted into a slot",
                                    buckets=TTFT_BUCKETS, registry=r)
        self.prefill_time = Histogram("realizar:request_prefill_time_seconds", "Admitted to first token",
                                      buckets=TTFT_BUCKETS, registry=r)
        self.decode_time = Histogram("realizar:request_decode_time_seconds", "First token to last token",
                                     buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("realizar:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("realizar:generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.success = Counter("realizar:request_success", "Finished choices by engine finish_reason",
                               ["finish_reason"], registry=r)
        self.errors = Counter("realizar:request_errors", "Requests answered with an error, by HTTP status",
                              ["status"], registry=r)

    def finished(self, stats, finish_reasons) -> None:
        """Record one engine request once it is over (stats: RequestStats; finish_reasons: the engine's, per choice)."""
        end = stats.finished if stats.finished is not None else time.perf_counter()
        self.e2e.observe(max(0.0, end - stats.submitted))
        if stats.admitted is not None:
            self.queue_time.observe(max(0.0, stats.admitted - stats.submitted))
        if stats.first_token is not None:
            self.ttft.observe(max(0.0, stats.first_token - stats.submitted))
            self.decode_time.observe(max(0.0, end - stats.first_token))
            if stats.admitted is not None:
                self.prefill_time.observe(max(0.0, stats.first_token - stats.admitted))
            per_choice = stats.generated_tokens / max(1, len(finish_reasons))
            if per_choice > 1:
                self.itl.observe(max(0.0, end - stats.first_token) / (per_choice - 1))
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.generated_tokens)
        for reason in finish_reasons:
            self.success.labels(reason or "unknown").inc()

    def error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
