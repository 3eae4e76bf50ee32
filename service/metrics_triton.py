"""Triton's per-model inference metrics (``nv_inference_*``), rendered when Prometheus scrapes.

The values are read from the statistics that ModelStatistics reports (service/stats.py), so the
request path records nothing extra and the two always agree. The text is Triton's: counters
named without prometheus_client's ``_total`` suffix (Triton dashboards and alerts query
``nv_inference_request_success``, not ``..._total``), labels ``model`` and ``version``,
durations in whole microseconds. prometheus_client cannot emit a counter under such a name,
hence this small renderer (label values escaped as the text format 0.0.4 says).

Label sets: one per (model, version number) with statistics in this process, i.e. versions
loaded since their model was created (a deleted model's go with it). Requests that fail before
a model is resolved (an unknown name, a version that does not exist) make no label here; they
are counted by method and status code in ``paramserve_requests``, whose labels are bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .stats import ModelStats, Statistics

# (name, Triton's help text, value from one version's statistics)
COUNTERS: tuple[tuple[str, str, Callable[[ModelStats], int]], ...] = (
    (
        "nv_inference_request_success",
        "Number of successful inference requests, all batch sizes",
        lambda s: s.success.count,
    ),
    (
        "nv_inference_request_failure",
        "Number of failed inference requests, all batch sizes",
        lambda s: s.fail.count,
    ),
    (
        "nv_inference_count",
        "Number of inferences performed (does not include cached requests)",
        lambda s: s.inference_count,
    ),
    (
        "nv_inference_exec_count",
        "Number of model executions performed (does not include cached requests)",
        lambda s: s.execution_count,
    ),
    (
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds (includes cached requests)",
        lambda s: s.success.ns // 1000,
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
        lambda s: s.queue.ns // 1000,
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds (does not include cached requests)",
        lambda s: s.compute_input.ns // 1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
        lambda s: s.compute_infer.ns // 1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative inference compute output duration in microseconds (does not include "
        "cached requests)",
        lambda s: s.compute_output.ns // 1000,
    ),
)
PENDING = (
    "nv_inference_pending_request_count",
    "Instantaneous number of pending requests awaiting execution per-model.",
)


class TritonFamilies:
    """``statistics``: the manager's per-version statistics. ``inflight``: ((model, version
    number), requests queued or running in it) for each loaded version."""

    def __init__(
        self,
        statistics: Statistics,
        inflight: Callable[[], Iterable[tuple[tuple[str, int], int]]] = lambda: (),
    ):
        self.statistics, self.inflight = statistics, inflight

    def render(self) -> str:
        """The families in the Prometheus text format 0.0.4 (called from the scrape thread)."""
        entries = [
            (_labels(name, number), stats) for (name, number), stats in self.statistics.snapshot()
        ]
        lines: list[str] = []
        for family, help_text, value in COUNTERS:
            lines += [f"# HELP {family} {help_text}", f"# TYPE {family} counter"]
            lines += [f"{family}{labels} {value(stats)}" for labels, stats in entries]
        pending: dict[tuple[str, int], int] = {}
        for key, count in self.inflight():
            pending[key] = pending.get(key, 0) + count
        family, help_text = PENDING
        lines += [f"# HELP {family} {help_text}", f"# TYPE {family} gauge"]
        lines += [f"{family}{_labels(*key)} {count}" for key, count in sorted(pending.items())]
        return "\n".join(lines) + "\n"


def _labels(model: str, number: int) -> str:
    return f'{{model="{_escape(model)}",version="{number}"}}'


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def inflight_of(manager) -> list[tuple[tuple[str, int], int]]:
    """((model, version number), requests queued or running) of each loaded version."""
    return [((m.model.name, m.version.number), m.inflight) for m in manager.loaded()]
