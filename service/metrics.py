"""Prometheus metrics on their own HTTP address: requests, latencies, loaded models, bytes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, loaded_models=lambda: 0):
        self.registry = CollectorRegistry()
        self.requests = Counter("paramserve_requests", "gRPC requests by method and status",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("paramserve_request_seconds", "gRPC request latency",
                                 ["method"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.bytes = Counter("paramserve_bytes", "tensor and parameter bytes moved",
                             ["direction"], registry=self.registry)
        self.loaded = Gauge("paramserve_loaded_models", "model versions loaded in memory",
                            registry=self.registry)
        self.loaded.set_function(loaded_models)
        self._children: dict = {}
        self._bytes_children: dict = {}

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        children = self._children.get((method, code))
        if children is None:  # labels() costs a lock and a dict walk: once per label set
            children = self._children[(method, code)] = (self.requests.labels(method, code),
                                                         self.latency.labels(method))
        children[0].inc()
        children[1].observe(seconds)

    def bytes_moved(self, direction: str, count: int) -> None:
        child = self._bytes_children.get(direction)
        if child is None:
            child = self._bytes_children[direction] = self.bytes.labels(direction)
        child.inc(count)

    def serve(self, host: str, port: int):
        """Start the HTTP endpoint; returns ``(http_server, bound_port)``."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port
