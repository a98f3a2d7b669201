"""Prometheus metrics for ``GET /metrics``: the engine's state read from ``AsyncEngine.stats()`` at scrape time
(requests running and waiting, KV blocks used / free / total, preemptions, prompt and generation token totals) and
the latency histograms the handlers observe (time to first token, time per output token, end-to-end)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "neox_rt"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class _EngineCollector:
    """Reads the engine's stats snapshot on every scrape (no copy of the numbers kept here)."""

    def __init__(self, stats, model_name: str):
        self._stats = stats
        self._model = model_name

    def collect(self):
        s = self._stats()
        labels = ["model_name"]
        gauges = [("num_requests_running", "Requests in the running batch.", "num_running"),
                  ("num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting"),
                  ("kv_blocks_used", "KV cache blocks held by requests.", "num_blocks_used"),
                  ("kv_blocks_free", "KV cache blocks free.", "num_blocks_free"),
                  ("kv_blocks_total", "KV cache blocks in the pool.", "num_blocks_total")]
        for name, doc, key in gauges:
            g = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            g.add_metric([self._model], float(s.get(key, 0)))
            yield g
        counters = [("num_preemptions", "Requests preempted (recomputed later).", "num_preemptions"),
                    ("prompt_tokens", "Prompt tokens the engine has taken in.", "prompt_tokens_total"),
                    ("generation_tokens", "Tokens the engine has generated.", "generation_tokens_total")]
        for name, doc, key in counters:
            c = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            c.add_metric([self._model], float(s.get(key, 0)))
            yield c


class ServerMetrics:
    """One registry per app (several apps in one process, as in tests, do not collide)."""

    def __init__(self, stats, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name))
        labels = ["model_name"]
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Arrival to first generated token.",
                              labels, buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "Time between a request's tokens after "
                              "the first.", labels, buckets=TPOT_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)
        self._finished = Counter(f"{PREFIX}_request_success", "Requests finished, by finish reason.",
                                 labels + ["finished_reason"], registry=self.registry)
        self.aborted = Counter(f"{PREFIX}_request_aborted", "Engine requests aborted before they finished (a "
                               "client that went away).", labels, registry=self.registry).labels(model_name)
        self._errors = Counter(f"{PREFIX}_request_errors", "Requests answered with an error, by HTTP status.",
                               labels + ["status"], registry=self.registry)

    def finished(self, reason: str) -> None:
        self._finished.labels(self.model_name, reason).inc()

    def error(self, status: int) -> None:
        self._errors.labels(self.model_name, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """One engine request's token timing: TTFT at its first tokens, TPOT for every later token."""

    __slots__ = ("metrics", "arrival", "last", "tokens")

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self.metrics, self.arrival, self.last, self.tokens = metrics, arrival, None, 0

    def tokens_out(self, count: int, now: float) -> None:
        if count <= 0:
            return
        if self.last is None:
            self.metrics.ttft.observe(now - self.arrival)
        else:
            # a step that delivers several tokens at once spreads its interval over them
            for _ in range(count):
                self.metrics.tpot.observe((now - self.last) / count)
        self.last = now
        self.tokens += count

    def done(self, reason: str | None, now: float) -> None:
        self.metrics.e2e.observe(now - self.arrival)
        self.metrics.finished(reason or "abort")
