"""Dynamic batching for one loaded model whose forward treats rows independently.

Requests arriving while a batch runs wait in a queue; when the model is free, everything
queued (up to ``max_batch_size`` rows, same other dims and dtype) is concatenated into one
forward and the output split back by rows. A request is one tensor or a tuple of them (a
model with several inputs): each input is concatenated along its batch dim (``input_dims``)
and each output split along its own (``output_dims``). An idle model runs a lone request at
once (on the next turn of the event loop, so requests that arrived together share it), so
batching adds no latency at low load; ``max_queue_delay_us`` > 0 additionally waits that long
for company. A full queue is refused at once (RESOURCE_EXHAUSTED); a request whose deadline
passed while queued is dropped before it runs.

The batcher is driven by event-loop callbacks, not a task: a request costs one future and no
task switch beyond the caller's own, which matters when the forward itself takes 20 µs.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from paramserve.registry.errors import ParamserveError, ResourceExhausted

from .status import DeadlineExceeded  # noqa: F401  (defined there: the client needs it)

# Requests that keep arriving alone skip the queue: after this many one-request batches in a
# row, a request runs at once on the loop (when the forward runs there), saving the queue's
# turn of the loop; every PROBE_EVERY-th still goes through the queue to look for company.
LONELY_BATCHES = 8
PROBE_EVERY = 16


class BatchingError(ParamserveError):
    """A batched forward's output did not split back into its requests' rows."""


Parts = torch.Tensor | tuple[torch.Tensor, ...]  # one request's inputs, or a forward's outputs


@dataclass
class _Pending:
    x: Parts
    future: asyncio.Future
    deadline: float | None  # time.monotonic() seconds
    queued_ns: int  # time.perf_counter_ns() when it was queued


class Batcher:
    def __init__(
        self,
        forward: Callable[[Parts], Parts],
        executor: Executor | None,
        max_batch_size: int,
        max_queue_delay_us: int = 0,
        max_queue_size: int = 1024,
        on_batch: Callable[[int, int, int, int], None] | None = None,
        inline_max_elements: int = 0,
        input_dims: Sequence[int] = (0,),
        output_dims: Sequence[int] = (0,),
    ):
        """``forward``: a plain function (it must not hold the batcher's owner, or the two
        would keep each other alive). ``executor``: where forwards run (one thread keeps one
        OpenMP team busy; None: the loop's default executor); a batch of at most
        ``inline_max_elements`` input elements runs on the event loop instead, for forwards
        shorter than a thread hop (0: never). ``input_dims``/``output_dims``: the batch dim of
        each input and output, in order."""
        self.forward = forward
        self.input_dims = tuple(input_dims)
        self.output_dims = tuple(output_dims)
        self.executor = executor
        self.inline_max_elements = inline_max_elements
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        # (rows, requests, forward ns, queue ns summed over the requests) per executed batch
        self.on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._busy = False  # a batch is running in the executor
        self._scheduled = False  # a flush is already on the event loop's schedule
        self._lonely = 0  # one-request batches in a row
        self._skipped = 0  # requests run at once since the queue last found company

    def run_alone(self, x: Parts) -> Parts | None:
        """The output at once, when requests have been arriving alone and the forward runs
        on the loop; ``None``: use ``submit``."""
        if (
            _numel(x) > self.inline_max_elements
            or self._queue
            or self._scheduled
            or self._lonely < LONELY_BATCHES
        ):
            return None
        self._skipped += 1
        if self._skipped % PROBE_EVERY == 0:
            return None
        y, forward_ns = self._timed_forward(x)
        if self.on_batch:
            self.on_batch(self._out_rows(y), 1, forward_ns, 0)
        return y

    def submit(self, x: Parts, timeout_s: float | None = None) -> asyncio.Future:
        """Queue one request; the returned future holds its rows of the batch's output."""
        if len(self._queue) >= self.max_queue_size:
            raise ResourceExhausted(
                f"the model's queue is full ({self.max_queue_size} "
                "requests); retry later or add replicas"
            )
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._queue.append(_Pending(x, future, deadline, time.perf_counter_ns()))
        if not self._busy and not self._scheduled:
            self._scheduled = True
            if self.max_queue_delay_s:
                loop.call_later(self.max_queue_delay_s, self._flush)
            else:
                loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        batch = self._take()
        if not batch:
            return
        if len(batch) == 1:
            self._lonely += 1
        else:
            self._lonely = self._skipped = 0
        started_ns = time.perf_counter_ns()
        queue_ns = sum(started_ns - p.queued_ns for p in batch)
        xs = [p.x for p in batch]
        try:
            merged = xs[0] if len(xs) == 1 else self._cat(xs)
        except Exception as err:  # every request of the batch hears why; none hangs
            _fail(batch, err)
            self._schedule_next()
            return
        if _numel(merged) <= self.inline_max_elements:
            try:
                result = self._timed_forward(merged)
            except Exception as err:
                _fail(batch, err)
            else:
                self._deliver(batch, xs, result, queue_ns)
            self._schedule_next()
            return
        self._busy = True
        running = asyncio.get_running_loop().run_in_executor(
            self.executor, self._timed_forward, merged
        )
        running.add_done_callback(lambda done: self._finished(batch, xs, done, queue_ns))

    def _finished(
        self, batch: list[_Pending], xs: list[Parts], done: asyncio.Future, queue_ns: int
    ) -> None:
        self._busy = False
        if done.cancelled():  # the loop is shutting down
            for pending in batch:
                pending.future.cancel()
            return
        err = done.exception()
        if err is not None:
            _fail(batch, err)
        else:
            self._deliver(batch, xs, done.result(), queue_ns)
        if self._queue and not self._scheduled:
            self._flush()  # now, not after the woken requests have sent their replies

    def _timed_forward(self, x: Parts) -> tuple[Parts, int]:
        start = time.perf_counter_ns()
        y = self.forward(x)
        return y, time.perf_counter_ns() - start

    def _deliver(self, batch, xs, result: tuple[Parts, int], queue_ns: int) -> None:
        """Each request gets its rows; an output that does not split by the inputs' rows
        fails every request of the batch (nothing is left waiting)."""
        y, forward_ns = result
        try:
            if self.on_batch:
                self.on_batch(self._out_rows(y), len(batch), forward_ns, queue_ns)
            if len(xs) == 1:
                parts: Sequence[Parts] = [y]
            else:
                parts = self._split(y, [self._in_rows(x) for x in xs])
        except Exception as err:
            _fail(batch, err)
            return
        for pending, part in zip(batch, parts):
            if not pending.future.done():
                pending.future.set_result(part)

    # ---- one tensor or several, along their batch dims --------------------------------
    def _in_rows(self, x: Parts) -> int:
        first = x if isinstance(x, torch.Tensor) else x[0]
        return first.shape[self.input_dims[0]] if first.dim() else 1

    def _out_rows(self, y: Parts) -> int:
        first = y if isinstance(y, torch.Tensor) else y[0]
        return first.shape[self.output_dims[0]] if first.dim() else 1

    def _cat(self, xs: list[Parts]) -> Parts:
        if isinstance(xs[0], torch.Tensor):
            return torch.cat(xs, self.input_dims[0])  # type: ignore[arg-type]
        return tuple(torch.cat([x[i] for x in xs], self._in_dim(i)) for i in range(len(xs[0])))

    def _in_dim(self, i: int) -> int:
        return self.input_dims[i] if i < len(self.input_dims) else 0

    def _split(self, y: Parts, rows: list[int]) -> list[Parts]:
        outputs = (y,) if isinstance(y, torch.Tensor) else y
        pieces = []
        for i, out in enumerate(outputs):
            dim = self.output_dims[i] if i < len(self.output_dims) else 0
            got = out.shape[dim] if out.dim() > dim else None
            if got != sum(rows):
                raise BatchingError(
                    f"the model answered {'a scalar' if got is None else got} rows for "
                    f"{sum(rows)} input rows, so its requests cannot be batched; mark its "
                    "architecture batchable=False"
                )
            pieces.append(torch.split(out, rows, dim))
        if isinstance(y, torch.Tensor):
            return list(pieces[0])
        return [tuple(p[i] for p in pieces) for i in range(len(rows))]

    def _schedule_next(self) -> None:
        """What queued while the batch ran goes next, on the following turn of the loop."""
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _take(self) -> list[_Pending]:
        """The next batch: queued requests sharing the first one's trailing shape and dtype,
        up to max_batch_size rows; expired or cancelled ones are dropped."""
        now = time.monotonic()
        batch: list[_Pending] = []
        rows = 0
        kept: deque[_Pending] = deque()
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.done():
                continue
            if pending.deadline is not None and pending.deadline <= now:
                pending.future.set_exception(
                    DeadlineExceeded(
                        "the request's deadline passed while it waited in the model's queue"
                    )
                )
                continue
            fits = not batch or self._fits(pending.x, batch[0].x)
            if fits and (not batch or rows + self._in_rows(pending.x) <= self.max_batch_size):
                batch.append(pending)
                rows += self._in_rows(pending.x)
            else:
                kept.append(pending)
        self._queue = kept
        return batch

    def _fits(self, x: Parts, first: Parts) -> bool:
        """Same dtype and the same sizes off the batch dim, input by input."""
        if isinstance(x, torch.Tensor):
            return _same(x, first, self.input_dims[0])  # type: ignore[arg-type]
        return len(x) == len(first) and all(
            _same(a, b, self._in_dim(i)) for i, (a, b) in enumerate(zip(x, first))
        )


def _same(a: torch.Tensor, b: torch.Tensor, dim: int) -> bool:
    return (
        a.dtype == b.dtype
        and a.dim() == b.dim()
        and a.shape[:dim] == b.shape[:dim]
        and a.shape[dim + 1 :] == b.shape[dim + 1 :]
    )


def _numel(x: Parts) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else sum(t.numel() for t in x)


def _fail(batch: list[_Pending], err: BaseException) -> None:
    """The batch failed: each request hears why."""
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(err)
