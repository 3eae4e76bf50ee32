"""The model manager: versions resolved, loaded, placed, kept (LRU) and run.

``get(name, ref, input_shape)`` answers one inference request's question "which module runs
this?": it resolves the ref (cached until a registry change through this server), creates the
first version of a lazy model when needed (the store makes that exactly one version), loads the
version once even when many requests ask at the same time, and places it on a device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from paramserve.registry import Store
from paramserve.registry.errors import FailedPrecondition
from paramserve.registry.signature import Signature
from paramserve.registry.values import ModelInfo, VersionInfo

from .batcher import Batcher, DeadlineExceeded
from .placement import Placement, module_bytes

log = logging.getLogger("paramserve")


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class ModelStats:
    """Triton-style counters of one (model, version)."""

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


@dataclass
class LoadedModel:
    model: ModelInfo
    version: VersionInfo
    module: nn.Module
    device: torch.device
    signature: Signature
    size_bytes: int
    batcher: Batcher | None = None
    # Where forwards run: the device's compute thread, or None for the event loop itself
    # (a forward this short costs less than the hop to a thread and back).
    runner: Executor | None = None
    forward_s: float = float("inf")  # median forward on the example input, timed at load

    def forward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """One forward on the model's device, output on the CPU."""
        with torch.inference_mode():
            if self.device.type == "cuda":
                return _forward_on_gpu(self.module, x, self.device)
            return self.module(x)

    async def infer(self, x: torch.Tensor, timeout_s: float | None = None) -> torch.Tensor:
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded("the request's deadline had passed before it could run")
        if self.batcher is not None:
            alone = self.batcher.run_alone(x)
            return alone if alone is not None else await self.batcher.submit(x, timeout_s)
        if self.runner is None:
            return self.forward_tensor(x)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return await asyncio.get_running_loop().run_in_executor(
            self.runner, self._forward_before, x, deadline)

    def _forward_before(self, x: torch.Tensor, deadline: float | None) -> torch.Tensor:
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the request's deadline passed while it waited for the "
                                   "model; it never ran")
        return self.forward_tensor(x)


def _forward_on_gpu(module: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copies through pinned host buffers: the upload overlaps nothing else in flight, but
    pinned memory is what lets both copies run at full PCIe speed (pageable memory is staged
    through a driver buffer). The caching host allocator recycles the buffers."""
    staged = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    staged.copy_(x)
    y = module(staged.to(device, non_blocking=True))
    out = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
    out.copy_(y, non_blocking=True)
    torch.cuda.current_stream(device).synchronize()
    return out


class ModelManager:
    def __init__(self, store: Store, placement: Placement, executor: Executor,
                 memory_budget_bytes: int = 0, batching: BatchingPolicy | None = None):
        self.store = store
        self.batching = batching or BatchingPolicy()
        self.placement = placement
        self.executor = executor
        self.memory_budget_bytes = memory_budget_bytes
        self._compute: dict[str, ThreadPoolExecutor] = {}
        self._loaded: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._loading: dict[tuple, asyncio.Future] = {}
        self._generation: int | None = None
        # (name, ref) → the loaded model serving it: one dict lookup per request once warm.
        self._hot: dict[tuple[str, str], LoadedModel] = {}
        self._resolved: dict[tuple[str, str], VersionInfo | None] = {}
        self._models: dict[str, ModelInfo] = {}
        self.stats: dict[tuple[str, int], ModelStats] = {}

    async def run_blocking(self, fn, *args):
        """Run a blocking call (SQL, torch, file I/O) in the worker pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def model(self, name: str) -> ModelInfo:
        info = self._models.get(name)
        if info is None:
            info = self._models[name] = await self.run_blocking(self.store.get_model, name)
        return info

    async def resolve(self, name: str, ref: str) -> VersionInfo | None:
        """The version ``ref`` names; ``None`` when the model has none yet and ref is empty."""
        key = (name, ref)
        if key not in self._resolved:
            self._resolved[key] = await self.run_blocking(self.store.version_or_none, name, ref)
        return self._resolved[key]

    def hot(self, name: str, ref: str) -> LoadedModel | None:
        """The model serving (name, ref) if it is loaded and nothing changed since: no await."""
        return self._hot.get((name, ref))

    async def get(self, name: str, ref: str,
                  input_shape: Sequence[int] | None = None) -> LoadedModel:
        hot = self._hot.get((name, ref))
        if hot is not None:
            return hot
        model = await self.model(name)
        version = await self.resolve(name, ref)
        if version is None:
            if not model.lazy or input_shape is None:
                raise FailedPrecondition(
                    f"model {name!r} has no version to serve yet; upload parameters "
                    f"(`paramserve upload {name} FILE`) or initialize it (`paramserve init "
                    f"{name} SCHEME`)")
            version = await self.run_blocking(self.store.materialize, name, tuple(input_shape))
            self.forget(name)
        loaded = await self.load(model, version)
        if (name, ref) in self._resolved:  # nothing changed while it loaded
            self._hot[(name, ref)] = loaded
        return loaded

    async def load(self, model: ModelInfo, version: VersionInfo) -> LoadedModel:
        # created_at tells a model from a namesake created after it was deleted (elsewhere).
        key = (model.name, model.created_at, version.number)
        loaded = self._loaded.get(key)
        if loaded is not None:
            self._loaded.move_to_end(key)
            return loaded
        pending = self._loading.get(key)
        if pending is None:
            pending = self._loading[key] = asyncio.ensure_future(
                self.run_blocking(self._load_blocking, model, version))
            pending.add_done_callback(lambda _: self._loading.pop(key, None))
        loaded = await asyncio.shield(pending)
        if key not in self._loaded:
            inline = loaded.device.type == "cpu" and loaded.forward_s < INLINE_FORWARD_S
            loaded.runner = None if inline else self.compute_thread(loaded.device)
            self._attach_batcher(loaded)
            self._loaded[key] = loaded
            self._evict_over_budget(loaded.device)
        return self._loaded[key]

    def _attach_batcher(self, loaded: LoadedModel) -> None:
        max_batch, delay_us = self.batching.for_model(loaded.model.name)
        if not loaded.signature.batchable or max_batch <= 1:
            return  # never merge requests for a forward that mixes rows
        stats = self.stats_for(loaded.model.name, loaded.version.number)

        def count_batch(rows: int, requests: int, forward_ns: int) -> None:
            stats.execution_count += 1
            per_size = stats.batch_rows.get(rows)
            if per_size is None:
                per_size = stats.batch_rows[rows] = Duration()
            per_size.add(forward_ns)

        loaded.batcher = Batcher(loaded.forward_tensor, loaded.runner, max_batch, delay_us,
                                 self.batching.max_queue_size, on_batch=count_batch)

    def _load_blocking(self, model: ModelInfo, version: VersionInfo) -> LoadedModel:
        module = self.store.load_version(model, version)
        size = module_bytes(module)
        device = self.placement.choose(size)
        module.to(device)
        loaded = LoadedModel(model, version, module, device,
                             self.store.signature(model, version), size)
        loaded.forward_s = _forward_s(loaded)
        return loaded

    def compute_thread(self, device: torch.device) -> ThreadPoolExecutor:
        """One thread per device runs every forward there: one OpenMP team stays warm instead
        of one per pool thread fighting over the cores, and batches form while it works."""
        key = str(device)
        if key not in self._compute:
            self._compute[key] = ThreadPoolExecutor(1, thread_name_prefix=f"compute-{key}")
        return self._compute[key]

    def shutdown(self) -> None:
        for executor in self._compute.values():
            executor.shutdown(wait=True)

    def _evict_over_budget(self, device: torch.device) -> None:
        if not self.memory_budget_bytes:
            return
        on_device = [k for k, m in self._loaded.items() if m.device == device]
        used = sum(self._loaded[k].size_bytes for k in on_device)
        for key in on_device[:-1]:  # least recently used first; never the newest
            if used <= self.memory_budget_bytes:
                break
            evicted = self._loaded.pop(key)
            self._hot = {k: v for k, v in self._hot.items() if v is not evicted}
            used -= evicted.size_bytes

    async def signature(self, name: str, ref: str) -> tuple[ModelInfo, VersionInfo | None,
                                                            Signature]:
        model = await self.model(name)
        version = await self.resolve(name, ref)
        loaded = self._loaded.get((name, model.created_at, version.number)) if version else None
        if loaded is not None:
            return model, version, loaded.signature
        return model, version, await self.run_blocking(self.store.signature, model, version)

    async def watch(self, interval_s: float) -> None:
        """Poll the registry's generation; on a change made elsewhere (another replica, a
        script on the store) drop every cached resolution, so the change is served within
        about ``interval_s``. Loaded modules stay: a version's parameters never change."""
        while True:
            try:
                generation = await self.run_blocking(self.store.generation)
                if self._generation is not None and generation != self._generation:
                    self._resolved.clear()
                    self._models.clear()
                    self._hot.clear()
                self._generation = generation
            except Exception:  # a database hiccup must not end the watch
                log.warning("cannot read the registry generation", exc_info=True)
            await asyncio.sleep(interval_s)

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def unload(self, name: str) -> int:
        self._hot = {k: v for k, v in self._hot.items() if k[0] != name}
        keys = [k for k in self._loaded if k[0] == name]
        for key in keys:
            del self._loaded[key]  # requests already queued on its batcher still run
        return len(keys)

    def forget(self, name: str, unload: bool = False) -> None:
        """Drop what is cached about ``name`` after a change to it through this server."""
        self._models.pop(name, None)
        for key in [k for k in self._resolved if k[0] == name]:
            del self._resolved[key]
        for key in [k for k in self._hot if k[0] == name]:
            del self._hot[key]
        if unload:
            self.unload(name)

    def stats_for(self, name: str, number: int) -> ModelStats:
        return self.stats.setdefault((name, number), ModelStats())

    def record(self, loaded: LoadedModel, ok: bool, start_ns: int, decoded_ns: int,
               computed_ns: int, end_ns: int, rows: int = 1) -> None:
        """Per-request counters; batched executions are counted by the batcher."""
        stats = self.stats_for(loaded.model.name, loaded.version.number)
        (stats.success if ok else stats.fail).add(end_ns - start_ns)
        if ok:
            stats.inference_count += rows
            if loaded.batcher is None:
                stats.execution_count += 1
            stats.compute_input.add(decoded_ns - start_ns)
            stats.compute_infer.add(computed_ns - decoded_ns)
            stats.compute_output.add(end_ns - computed_ns)
            stats.queue.add(0)
        stats.last_inference_ms = int(time.time() * 1000)


INLINE_FORWARD_S = 0.0002


def _forward_s(loaded: LoadedModel) -> float:
    """Median time of a forward on the example input (which also warms the module up)."""
    arch_shape = [d if d >= 0 else 1 for d in loaded.signature.inputs[0].shape]
    x = torch.zeros(arch_shape, dtype=loaded.signature.inputs[0].dtype)
    times = []
    try:
        for _ in range(5):
            start = time.perf_counter()
            loaded.forward_tensor(x)
            times.append(time.perf_counter() - start)
    except Exception:  # a free dim the model cannot take as 1: keep it off the loop
        return float("inf")
    return sorted(times)[len(times) // 2]


@dataclass(frozen=True)
class BatchingPolicy:
    """Server-wide batching defaults with per-model overrides (name → (max rows, delay µs))."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024
    per_model: tuple[tuple[str, int, int], ...] = ()

    def for_model(self, name: str) -> tuple[int, int]:
        for model, max_batch, delay_us in self.per_model:
            if model == name:
                return max_batch, delay_us
        return self.max_batch_size, self.max_queue_delay_us
