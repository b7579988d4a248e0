"""``/metrics`` in Prometheus' text format (``prometheus_client``), with vLLM's metric names under ``jaxpipe:``.

From the engine, read at each scrape (``engine.stats()``): ``jaxpipe:num_requests_running``,
``jaxpipe:num_requests_waiting`` (gauges), ``jaxpipe:prompt_tokens_total``,
``jaxpipe:generation_tokens_total``, and when the engine counts them ``jaxpipe:compiled_programs_total``
and ``jaxpipe:compile_seconds_total`` (counters). Measured by the server, per request, from its arrival at
the HTTP handler: ``jaxpipe:time_to_first_token_seconds``, ``jaxpipe:inter_token_latency_seconds``
(the gap between a request's successive outputs, divided over the tokens that output carried),
``jaxpipe:e2e_request_latency_seconds`` (histograms), ``jaxpipe:request_success_total{finished_reason}``
and ``jaxpipe:request_rejected_total`` (503s of the bounded waiting queue). Every series carries a
``model_name`` label, as vLLM's do.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class _EngineCollector:
    """Reads the engine's own counters at scrape time (so they are exact, never double-counted)."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self):
        s = self.engine.stats()
        for name, doc, value in (
                ("jaxpipe:num_requests_running", "Requests in the engine's slots.", s.num_running),
                ("jaxpipe:num_requests_waiting", "Requests waiting for a slot.", s.num_waiting)):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], value)
            yield g
        counters = [("jaxpipe:prompt_tokens", "Prompt tokens prefilled.", s.prompt_tokens_total),
                    ("jaxpipe:generation_tokens", "Tokens generated.", s.generation_tokens_total)]
        if hasattr(s, "num_compiled_programs"):  # compilation while serving shows in latencies: expose it
            counters += [("jaxpipe:compiled_programs", "Device programs compiled.", s.num_compiled_programs),
                         ("jaxpipe:compile_seconds", "Time spent compiling device programs.", s.compile_s)]
        for name, doc, value in counters:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([self.model_name], value)
            yield c


class ServerMetrics:
    """The server's registry (its own, not prometheus_client's global one, so that several apps can live
    in one process) and the per-request observations the handlers make."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        self.model_name = model_name
        labels = ["model_name"]
        self._ttft = Histogram("jaxpipe:time_to_first_token_seconds", "Time to the first generated token.",
                               labels, buckets=_TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self._itl = Histogram("jaxpipe:inter_token_latency_seconds", "Time between generated tokens.",
                              labels, buckets=_ITL_BUCKETS, registry=self.registry).labels(model_name)
        self._e2e = Histogram("jaxpipe:e2e_request_latency_seconds", "Time from arrival to the last token.",
                              labels, buckets=_E2E_BUCKETS, registry=self.registry).labels(model_name)
        self._success = Counter("jaxpipe:request_success", "Requests finished, by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self._rejected = Counter("jaxpipe:request_rejected", "Requests refused with 503 (waiting queue full).",
                                 labels, registry=self.registry).labels(model_name)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def rejected(self) -> None:
        self._rejected.inc()

    def timer(self, arrival: float) -> RequestTimer:
        return RequestTimer(self, arrival)


class RequestTimer:
    """One engine request's latencies, fed with the time each of its outputs reached the handler."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.m, self.arrival = metrics, arrival
        self.last: float | None = None

    def tokens(self, now: float, count: int) -> None:
        if count <= 0:
            return
        if self.last is None:
            self.m._ttft.observe(now - self.arrival)
        else:
            gap = (now - self.last) / count
            for _ in range(count):
                self.m._itl.observe(gap)
        self.last = now

    def finished(self, now: float, reasons: list[str | None]) -> None:
        self.m._e2e.observe(now - self.arrival)
        for r in reasons:
            self.m._success.labels(self.m.model_name, r or "abort").inc()
