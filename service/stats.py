"""Triton-style inference statistics per (model, version), as ModelStatistics reports them.

Entries belong to one incarnation of a model (its ``created_at``): a model deleted and created
again under the same name starts from zero instead of inheriting its namesake's counters.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class ModelStats:
    """Counters of one (model, version)."""

    created_at: dt.datetime | None = None
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    # rows per execution → (executions, forward ns in all): Triton's batch_stats
    batch_rows: dict[int, Duration] = field(default_factory=dict)

    def count_batch(self, rows: int, requests: int, forward_ns: int, queue_ns: int) -> None:
        """One batched execution of ``requests`` requests (the batcher's ``on_batch``)."""
        self.execution_count += 1
        self.queue.add(queue_ns, requests)
        per_size = self.batch_rows.get(rows)
        if per_size is None:
            per_size = self.batch_rows[rows] = Duration()
        per_size.add(forward_ns)

    def count_request(
        self,
        ok: bool,
        start_ns: int,
        decoded_ns: int,
        computed_ns: int,
        end_ns: int,
        rows: int,
        batched: bool,
    ) -> None:
        (self.success if ok else self.fail).add(end_ns - start_ns)
        if ok:
            self.inference_count += rows
            if not batched:
                self.execution_count += 1
            self.compute_input.add(decoded_ns - start_ns)
            self.compute_infer.add(computed_ns - decoded_ns)
            self.compute_output.add(end_ns - computed_ns)
        self.last_inference_ms = int(time.time() * 1000)


class Statistics:
    """(name, version number) → ``ModelStats`` of the model's current incarnation."""

    def __init__(self):
        self._by_key: dict[tuple[str, int], ModelStats] = {}

    def of(self, name: str, number: int, created_at: dt.datetime | None) -> ModelStats:
        stats = self._by_key.get((name, number))
        if stats is None or stats.created_at != created_at:
            stats = self._by_key[(name, number)] = ModelStats(created_at=created_at)
        return stats

    def forget(self, name: str) -> None:
        for key in [k for k in self._by_key if k[0] == name]:
            del self._by_key[key]

    def snapshot(self) -> list[tuple[tuple[str, int], ModelStats]]:
        """Every current (key, stats) pair, safe to call from another thread (the metrics
        scrape): the dict is copied in one step, so a model loaded meanwhile cannot break the
        iteration. Bounded by what exists: versions loaded since their model was created."""
        return sorted(list(self._by_key.items()), key=lambda entry: entry[0])

    def items(self, name: str = "", created_at: dt.datetime | None = None):
        """Sorted (key, stats) pairs, for one model's incarnation when ``name`` is given."""
        return sorted(
            (k, s)
            for k, s in self._by_key.items()
            if not name or (k[0] == name and s.created_at == created_at)
        )
