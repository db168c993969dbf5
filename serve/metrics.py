"""Prometheus metrics of one server, in a registry of its own (so several servers can live in one process).

The engine thread sets the engine gauges after each step and observes latencies as requests finish; the
servicer counts request outcomes by gRPC status. `serve_http` exposes the registry at /metrics.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

# Latency buckets in seconds: sub-millisecond decode steps on a GPU up to multi-second queueing.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
_THROUGHPUT_WINDOW_S = 1.0  # the tokens-per-second gauge averages over at least this long


class ServeMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.queue_length = Gauge("jinfer_queue_length", "requests waiting for a slot", registry=r)
        self.running = Gauge("jinfer_running_requests", "requests holding a decode slot", registry=r)
        self.pages_used = Gauge("jinfer_kv_pages_used", "KV pages held by requests", registry=r)
        self.pages_cached = Gauge("jinfer_kv_pages_cached",
                                  "KV pages only the prefix cache holds (reclaimable)", registry=r)
        self.pages_total = Gauge("jinfer_kv_pages_total",
                                 "usable KV pages in the pool (page 0 is reserved), as GetModelInfo's num_pages",
                                 registry=r)
        self.prefix_hit_rate = Gauge("jinfer_prefix_cache_hit_rate",
                                     "fraction of prompt tokens served from the prefix cache", registry=r)
        self.tokens_per_second = Gauge("jinfer_generation_tokens_per_second",
                                       "generated tokens per second over the last second or so", registry=r)
        self.generated_tokens = Counter("jinfer_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("jinfer_time_to_first_token_seconds",
                              "from arrival at the server to the first generated token", buckets=_TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("jinfer_inter_token_latency_seconds", "between consecutive tokens of a request",
                             buckets=_ITL_BUCKETS, registry=r)
        self.requests = Counter("jinfer_requests", "finished Generate calls by gRPC status code",
                                ["method", "status"], registry=r)
        self.finish_reasons = Counter("jinfer_finish_reasons", "completed requests by finish reason",
                                      ["reason"], registry=r)
        # Speculative decoding, counted when a request finishes (vLLM's spec_decode_num_* counters): the
        # acceptance rate is accepted / draft tokens, the mean accepted length 1 + accepted / verify steps.
        self.spec_draft_tokens = Counter("jinfer_spec_draft_tokens", "tokens proposed and verified", registry=r)
        self.spec_accepted_tokens = Counter("jinfer_spec_accepted_tokens", "proposed tokens accepted", registry=r)
        self.spec_verify_steps = Counter("jinfer_spec_verify_steps", "verify steps that carried a proposal",
                                         registry=r)
        self._lock = threading.Lock()
        self._window_tokens = 0
        self._window_start: float | None = None

    # ---- engine thread -------------------------------------------------------------------------

    def set_engine_state(self, *, waiting: int, running: int, pages_used: int, pages_cached: int,
                         pages_total: int, prefix_hit_rate: float, now: float) -> None:
        self.queue_length.set(waiting)
        self.running.set(running)
        self.pages_used.set(pages_used)
        self.pages_cached.set(pages_cached)
        self.pages_total.set(pages_total)
        self.prefix_hit_rate.set(prefix_hit_rate)
        with self._lock:
            if running == 0 and waiting == 0:
                # Idle: the engine thread sleeps until the next request, so the gauge must not keep
                # the last busy second's rate.
                self.tokens_per_second.set(0.0)
                self._window_tokens, self._window_start = 0, None
            elif self._window_start is None:
                self._window_start = now
            elif now - self._window_start >= _THROUGHPUT_WINDOW_S:
                self.tokens_per_second.set(self._window_tokens / (now - self._window_start))
                self._window_tokens, self._window_start = 0, now

    def add_generated_tokens(self, n: int) -> None:
        if n:
            self.generated_tokens.inc(n)
            with self._lock:
                self._window_tokens += n

    def observe_latencies(self, ttft: float | None, inter_token: list[float]) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
        for x in inter_token:
            self.itl.observe(x)

    def observe_speculation(self, draft_tokens: int, accepted_tokens: int, verify_steps: int) -> None:
        if verify_steps:
            self.spec_draft_tokens.inc(draft_tokens)
            self.spec_accepted_tokens.inc(accepted_tokens)
            self.spec_verify_steps.inc(verify_steps)

    # ---- event loop ----------------------------------------------------------------------------

    def record_outcome(self, method: str, status: str, finish_reason: str | None = None) -> None:
        self.requests.labels(method=method, status=status).inc()
        if finish_reason is not None:
            self.finish_reasons.labels(reason=finish_reason).inc()

    # ---- exposition ----------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve_http(self, host: str, port: int):
        """Serves /metrics on a daemon thread; returns (bound port, a function that stops it)."""
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            httpd.shutdown()
            httpd.server_close()
            thread.join(5)

        return httpd.server_address[1], stop
