"""Prometheus metrics on their own HTTP address (service/metrics_serve.py, ``/metrics`` only):
paramserve's families (requests by method and status, latencies, loaded models, bytes), Triton's
per-model ``nv_inference_*`` (service/metrics_triton.py) and prometheus_client's process,
platform and GC collectors.

The request path only adds to plain Python numbers (it runs on the one event-loop thread);
a collector turns them into metric families when Prometheus scrapes. prometheus_client's own
Counter and Histogram take a lock per update, which cost several µs on every inference.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import metrics_serve
from .metrics_triton import TritonFamilies

LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
# Distinct (method, code) series kept; past it, new ones are counted under method OTHER (a
# front end that passed client text as the method could otherwise grow the scrape unbounded).
MAX_REQUEST_SERIES = 1000
OTHER = "other"


class _Latency:
    """One method's latency histogram: a count per bucket (the last one is +Inf) and a sum."""

    __slots__ = ("counts", "total_s")

    def __init__(self):
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.total_s = 0.0


class Metrics:
    """``triton``: the ``nv_inference_*`` families (None: not exposed, e.g. in unit tests)."""

    def __init__(
        self,
        loaded_models: Callable[[], int] = lambda: 0,
        triton: TritonFamilies | None = None,
    ):
        self.registry = CollectorRegistry()
        self.loaded_models = loaded_models
        self.triton = triton
        self.requests: dict[tuple[str, str], int] = {}  # (method, code) → count
        self.latency: dict[str, _Latency] = {}
        self.bytes: dict[str, int] = {}  # direction → bytes
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        count = self.requests.get(key)
        if count is None and len(self.requests) >= MAX_REQUEST_SERIES:
            method, key = OTHER, (OTHER, code)
            count = self.requests.get(key, 0)
        self.requests[key] = (count or 0) + 1
        latency = self.latency.get(method)  # methods are bounded by the series above
        if latency is None:
            latency = self.latency[method] = _Latency()
        latency.counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        latency.total_s += seconds

    def bytes_moved(self, direction: str, count: int) -> None:
        self.bytes[direction] = self.bytes.get(direction, 0) + count

    def collect(self):
        """Called by prometheus_client on each scrape (from its HTTP thread)."""
        requests = CounterMetricFamily(
            "paramserve_requests", "gRPC requests by method and status", labels=["method", "code"]
        )
        for (method, code), count in list(self.requests.items()):
            requests.add_metric([method, code], count)
        yield requests
        latency = HistogramMetricFamily(
            "paramserve_request_seconds", "gRPC request latency", labels=["method"]
        )
        for method, histogram in list(self.latency.items()):
            counts, running, buckets = list(histogram.counts), 0, []
            for bound, count in zip([*map(_bound, LATENCY_BUCKETS_S), "+Inf"], counts):
                running += count
                buckets.append((bound, running))
            latency.add_metric([method], buckets, histogram.total_s)
        yield latency
        moved = CounterMetricFamily(
            "paramserve_bytes", "tensor and parameter bytes moved", labels=["direction"]
        )
        for direction, count in list(self.bytes.items()):
            moved.add_metric([direction], count)
        yield moved
        yield GaugeMetricFamily(
            "paramserve_loaded_models",
            "model versions loaded in memory",
            value=self.loaded_models(),
        )

    def exposition(self) -> bytes:
        """What a scrape of ``/metrics`` answers: the text format 0.0.4, as Triton's."""
        text = generate_latest(self.registry)
        if self.triton is not None:
            text += self.triton.render().encode()
        return text

    def serve(self, host: str, port: int):
        """Start the HTTP endpoint; returns ``(http_server, bound_port)``."""
        return metrics_serve.serve(host, port, self.exposition)


def _bound(seconds: float) -> str:
    return repr(float(seconds))
