"""Dynamic batching for one loaded model whose forward treats rows independently.

Requests arriving while a batch runs wait in a queue; when the model is free, everything
queued (up to ``max_batch_size`` rows, same trailing shape and dtype) is concatenated into one
forward and the output split back by rows. An idle model runs a lone request at once, so
batching adds no latency at low load; ``max_queue_delay_us`` > 0 additionally waits that long
for company. A full queue is refused at once (RESOURCE_EXHAUSTED); a request whose deadline
passed while queued is dropped before it runs.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from paramserve.registry.errors import ParamserveError, ResourceExhausted


class DeadlineExceeded(ParamserveError):
    """The caller's deadline passed while the request waited; it never ran."""


@dataclass
class _Pending:
    x: torch.Tensor
    future: asyncio.Future
    deadline: float | None  # time.monotonic() seconds


class Batcher:
    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], run_blocking,
                 max_batch_size: int, max_queue_delay_us: int = 0, max_queue_size: int = 1024,
                 on_batch: Callable[[int, int], None] | None = None):
        self.forward = forward
        self.run_blocking = run_blocking
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        self.on_batch = on_batch  # (rows, requests) per executed batch, for statistics
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._closed = False

    async def submit(self, x: torch.Tensor, timeout_s: float | None = None) -> torch.Tensor:
        if len(self._queue) >= self.max_queue_size:
            raise ResourceExhausted(f"the model's queue is full ({self.max_queue_size} "
                                    "requests); retry later or add replicas")
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._queue.append(_Pending(x, future, deadline))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_queue_delay_s and self._rows() < self.max_batch_size:
                await asyncio.sleep(self.max_queue_delay_s)
            batch = self._take()
            if not batch:
                continue
            try:
                xs = [p.x for p in batch]
                merged = xs[0] if len(xs) == 1 else torch.cat(xs)
                y = await self.run_blocking(self.forward, merged)
                if self.on_batch:
                    self.on_batch(merged.shape[0], len(batch))
                for pending, part in zip(batch, _split(y, [x.shape[0] for x in xs])):
                    if not pending.future.done():
                        pending.future.set_result(part)
            except Exception as err:  # the batch failed: each request hears why
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(err)

    def _rows(self) -> int:
        return sum(p.x.shape[0] for p in self._queue)

    def _take(self) -> list[_Pending]:
        """The next batch: queued requests sharing the first one's trailing shape and dtype,
        up to max_batch_size rows; expired or cancelled ones are dropped."""
        now = time.monotonic()
        batch: list[_Pending] = []
        rows, kept = 0, deque()
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.done():
                continue
            if pending.deadline is not None and pending.deadline <= now:
                pending.future.set_exception(DeadlineExceeded(
                    "the request's deadline passed while it waited in the model's queue"))
                continue
            fits = not batch or (pending.x.shape[1:] == batch[0].x.shape[1:]
                                 and pending.x.dtype == batch[0].x.dtype)
            if fits and (not batch or rows + pending.x.shape[0] <= self.max_batch_size):
                batch.append(pending)
                rows += pending.x.shape[0]
            else:
                kept.append(pending)
        self._queue = kept
        return batch

    def close(self) -> None:
        """Finish what is queued, then let the worker end (the model is being unloaded)."""
        self._closed = True
        self._wakeup.set()


def _split(y: torch.Tensor, rows: list[int]) -> list[torch.Tensor]:
    return list(torch.split(y, rows)) if len(rows) > 1 else [y]
