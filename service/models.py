"""The model manager: which loaded module answers a request, and when it stops answering.

``get(name, ref, input_shape)`` answers one inference request's question "which module runs
this?": it resolves the ref (cached by its canonical form until the model changes), creates the
first version of a lazy model when needed (the store makes that exactly one version), loads the
version once even when many requests ask at the same time, and places it on a device. What is
loaded is kept by ``LoadedModels`` (service/loaded.py), the one owner; this module decides what
goes there and when it leaves: evicted over the budget, retired when no ref serves its version
any more (an alias moved, a newer latest), or unloaded by the repository API.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import torch

from paramserve.registry import Store
from paramserve.registry.errors import FailedPrecondition, InvalidArgument, NotFound
from paramserve.registry.refs import parse_ref
from paramserve.registry.signature import Signature
from paramserve.registry.values import ModelInfo, VersionInfo

from .auth import current_author
from .batch_policy import BatchingPolicy, batching_override
from .batcher import Batcher
from .loaded import (
    INLINE_FORWARD_S,
    INLINE_MAX_ELEMENTS,
    LoadedModel,
    LoadedModels,
    ModelUnavailable,
    key_of,
)
from .placement import Placement, module_bytes
from .stats import Statistics

log = logging.getLogger("paramserve")

CONTROL_MODES = ("on-demand", "explicit")


class ModelManager:
    def __init__(
        self,
        store: Store,
        placement: Placement,
        executor: Executor,
        memory_budget_bytes: int = 0,
        batching: BatchingPolicy | None = None,
        control_mode: str = "on-demand",
    ):
        if control_mode not in CONTROL_MODES:
            raise InvalidArgument(
                f"--model-control-mode {control_mode!r}: use one of {', '.join(CONTROL_MODES)}"
            )
        self.store = store
        self.batching = batching or BatchingPolicy()
        self.placement = placement
        self.executor = executor
        self.control_mode = control_mode
        self.cache = LoadedModels(memory_budget_bytes)
        self.stats = Statistics()
        self._compute: dict[str, ThreadPoolExecutor] = {}
        self._loading: dict[tuple, asyncio.Future[LoadedModel]] = {}
        self._generation: int | None = None
        self._resolved: dict[tuple[str, Any], VersionInfo | None] = {}
        self._forgets = 0  # grows with every forget: a read that spans one is not cached
        self._models: dict[str, ModelInfo] = {}
        self._batching_overrides: dict[str, tuple[int, int]] = {}
        self._explicitly_loaded: set[str] = set()  # explicit mode: what RepositoryModelLoad made
        self._rechecks: set[asyncio.Task] = set()

    async def run_blocking(self, fn, *args):
        """Run a blocking call (SQL, torch, file I/O) in the worker pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- resolution --------------------------------------------------------------------
    async def model(self, name: str) -> ModelInfo:
        info = self._models.get(name)
        if info is None:
            forgets = self._forgets
            info = await self.run_blocking(self.store.get_model, name)
            if forgets == self._forgets:
                self._models[name] = info
        return info

    async def resolve(self, name: str, ref: int | str | None) -> VersionInfo | None:
        """The version ``ref`` names; ``None`` when the model has none yet and ref is empty.
        Cached by the canonical ref ("01" and "1" are one entry), so the cache holds at most
        the model's versions and aliases however many spellings clients send."""
        key = (name, parse_ref(ref))
        if key in self._resolved:
            return self._resolved[key]
        forgets = self._forgets
        version = await self.run_blocking(self.store.version_or_none, name, key[1])
        if forgets == self._forgets:  # else it may predate a change (pushed ones come fast)
            self._resolved[key] = version
        return version

    def hot(self, name: str, ref: str) -> LoadedModel | None:
        """The model serving (name, ref) if it is loaded and nothing changed since: no await."""
        return self.cache.hot(name, ref)

    async def get(
        self, name: str, ref: str, input_shape: Sequence[int] | None = None
    ) -> LoadedModel:
        hot = self.cache.hot(name, ref)
        if hot is not None:
            return hot
        self._check_available(name)
        model = await self.model(name)
        version = await self.resolve(name, ref)
        if version is None:
            if not model.lazy or input_shape is None:
                raise _nothing_to_serve(name)
            version = await self.run_blocking(
                self.store.materialize, name, tuple(input_shape), current_author()
            )
            self.forget(name)
            model = await self.model(name)
        loaded = await self.load(model, version)
        self._serve(name, ref, model, loaded)
        return loaded

    def _serve(self, name: str, ref: str, model: ModelInfo, loaded: LoadedModel) -> None:
        """Note that ``loaded`` serves ``ref``; make it hot if ref still names it. A change
        that came while it loaded rechecked only what was loaded then, so this one is
        rechecked now (else a version no ref names could stay loaded until the next change)."""
        canonical = parse_ref(ref)
        loaded.refs.add(canonical)
        current = self._resolved.get((name, canonical))
        if current is not None and key_of(model, current) == loaded.key:
            self.cache.serve(name, ref, canonical, loaded)
        else:
            self._recheck_later(name, [loaded])

    def _check_available(self, name: str) -> None:
        if not self.is_available(name):
            raise ModelUnavailable(
                f"model {name!r} is not loaded (explicit model control); "
                "load it with RepositoryModelLoad"
            )

    def is_available(self, name: str) -> bool:
        return self.control_mode != "explicit" or name in self._explicitly_loaded

    # ---- loading -----------------------------------------------------------------------
    async def load(self, model: ModelInfo, version: VersionInfo) -> LoadedModel:
        key = key_of(model, version)
        loaded = self.cache.get(key)
        if loaded is not None:
            return loaded
        pending = self._loading.get(key)
        if pending is None:
            pending = self._loading[key] = asyncio.ensure_future(
                self.run_blocking(self._load_blocking, model, version)
            )
            pending.add_done_callback(lambda _: self._loading.pop(key, None))
        loaded = await asyncio.shield(pending)
        if self.cache.get(key) is None:
            self._attach_batcher(loaded)
            self.cache.add(loaded)
        return self.cache.get(key) or loaded

    def _attach_batcher(self, loaded: LoadedModel) -> None:
        stats = self.stats.of(loaded.model.name, loaded.version.number, loaded.model.created_at)
        loaded.queue_time = stats.queue
        max_batch, delay_us = self.batching_for(loaded.model.name)
        if not loaded.signature.batchable or max_batch <= 1:
            return  # never merge requests for a forward that mixes rows
        loaded.batcher = Batcher(
            loaded.forward_fn(),
            loaded.runner,
            max_batch,
            delay_us,
            self.batching.max_queue_size,
            on_batch=stats.count_batch,
            inline_max_elements=INLINE_MAX_ELEMENTS if loaded.inline else 0,
            input_dims=[t.batch_dim for t in loaded.signature.inputs],
            output_dims=[t.batch_dim for t in loaded.signature.outputs],
        )

    def _load_blocking(self, model: ModelInfo, version: VersionInfo) -> LoadedModel:
        module = self.store.load_version(model, version)
        size = module_bytes(module)
        device = self.placement.choose(size)
        module.to(device)
        signature = self.store.signature(model, version)
        loaded = LoadedModel(
            model, version, module, device, signature, size, runner=self.compute_thread(device)
        )
        loaded.forward_s = _forward_s(loaded)
        loaded.inline = device.type == "cpu" and loaded.forward_s < INLINE_FORWARD_S
        if signature.batchable and not _rows_independent(loaded):
            log.warning(
                "model %r: its outputs do not follow its input rows one for one, so its "
                "requests are never batched; declare its architecture batchable=False",
                model.name,
            )
            loaded.signature = dataclasses.replace(signature, batchable=False)
        return loaded

    def compute_thread(self, device: torch.device) -> ThreadPoolExecutor:
        """One thread per device runs every forward there: one OpenMP team stays warm instead
        of one per pool thread fighting over the cores, and batches form while it works."""
        key = str(device)
        if key not in self._compute:
            self._compute[key] = ThreadPoolExecutor(  # torch's thread count is per thread
                1,
                thread_name_prefix=f"compute-{key}",
                initializer=torch.set_num_threads,
                initargs=(torch.get_num_threads(),),
            )
        return self._compute[key]

    def shutdown(self) -> None:
        for task in list(self._rechecks):
            task.cancel()
        for executor in self._compute.values():
            executor.shutdown(wait=True)

    async def signature(
        self, name: str, ref: str
    ) -> tuple[ModelInfo, VersionInfo | None, Signature]:
        model = await self.model(name)
        version = await self.resolve(name, ref)
        loaded = self.cache.get(key_of(model, version)) if version else None
        if loaded is not None:
            return model, version, loaded.signature
        return model, version, await self.run_blocking(self.store.signature, model, version)

    def loaded(self) -> list[LoadedModel]:
        return self.cache.all()

    # ---- change and unload -------------------------------------------------------------
    async def watch(self, interval_s: float, wake: asyncio.Event | None = None) -> None:
        """Follow the registry's generation; on a change made elsewhere (another replica, a
        script on the store) forget every cached resolution and retire the loaded versions no
        ref serves any more. It looks every ``interval_s`` and, when ``wake`` is set (a
        PostgreSQL notification: registry/notify.py), at once: a change is then served within
        milliseconds, else within about ``interval_s``. A registry that cannot be read is
        logged once (with its traceback) until it can be again, not once per look."""
        failing = False
        while True:
            if wake is not None:
                wake.clear()  # before the read: a change committed during it wakes us again
            try:
                generation = await self.run_blocking(self.store.generation)
                if self._generation is not None and generation != self._generation:
                    for name in {m.model.name for m in self.cache.all()} | set(self._models):
                        self.forget(name)
                    self._resolved.clear()
                    self._forgets += 1  # reads in flight now are not cached either
                self._generation = generation
                if failing:
                    log.info("the registry generation can be read again")
                    failing = False
            except Exception:  # a database hiccup must not end the watch
                if not failing:
                    log.warning(
                        "cannot read the registry generation; looking again every %g s",
                        interval_s,
                        exc_info=True,
                    )
                    failing = True
            if wake is None:
                await asyncio.sleep(interval_s)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), interval_s)

    def forget(self, name: str, unload: bool = False) -> None:
        """Drop what is cached about ``name`` after a change to it. Its loaded versions are
        rechecked: each stays only while one of the refs it was served for still names it.
        ``unload``: the model is gone; retire all of them and its statistics now."""
        self._forgets += 1
        self._models.pop(name, None)
        for key in [k for k in self._resolved if k[0] == name]:
            del self._resolved[key]
        self.cache.drop_hot(name)
        if unload:
            self.cache.retire_model(name, "model deleted")
            self.stats.forget(name)
            self._batching_overrides.pop(name, None)
            self._explicitly_loaded.discard(name)
            return
        loaded = self.cache.of_model(name)
        if loaded:
            self._recheck_later(name, loaded)

    def _recheck_later(self, name: str, loaded: list[LoadedModel]) -> None:
        task = asyncio.ensure_future(self._recheck(name, loaded))
        self._rechecks.add(task)
        task.add_done_callback(self._rechecks.discard)

    async def _recheck(self, name: str, loaded: list[LoadedModel]) -> None:
        try:
            model = await self.model(name)
        except NotFound:
            for entry in loaded:
                self.cache.retire(entry, "model deleted")
            self.stats.forget(name)
            return
        for entry in loaded:
            still = set()
            for ref in list(entry.refs):
                try:
                    version = await self.resolve(name, ref)
                except NotFound:
                    continue
                if version is not None and key_of(model, version) == entry.key:
                    still.add(ref)
            if still:
                entry.refs = still
            else:
                self.cache.retire(entry, "no ref serves this version any more")

    def unload(self, name: str) -> int:
        """RepositoryModelUnload: free the model's loaded versions now (requests in flight
        finish first). Under explicit control it is also not ready until loaded again."""
        self._explicitly_loaded.discard(name)
        return self.cache.retire_model(name, "unloaded by request")

    async def load_for_repository(
        self, name: str, parameters: Mapping[str, str] | None = None
    ) -> None:
        """RepositoryModelLoad: apply its config overrides, load the latest version (a lazy
        model with none stays ready for its first request) and, under explicit control,
        make the model available."""
        model = await self.model(name)
        override = batching_override(parameters or {}, name, self.store.limits)
        if override is not None and override != self._batching_overrides.get(name):
            self._batching_overrides[name] = override
            self.cache.retire_model(name, "reloaded with new batching settings")
        version = await self.resolve(name, "")
        if version is None and not model.lazy:
            raise _nothing_to_serve(name)
        if version is not None:
            self._serve(name, "", model, await self.load(model, version))
        self._explicitly_loaded.add(name)

    def batching_for(self, name: str) -> tuple[int, int]:
        return self._batching_overrides.get(name) or self.batching.for_model(name)

    # ---- statistics --------------------------------------------------------------------
    def record(
        self,
        loaded: LoadedModel,
        ok: bool,
        start_ns: int,
        decoded_ns: int,
        computed_ns: int,
        end_ns: int,
        rows: int = 1,
    ) -> None:
        """Per-request counters; batched executions are counted by the batcher, queue time
        where the request waited (``LoadedModel.infer``)."""
        stats = self.stats.of(loaded.model.name, loaded.version.number, loaded.model.created_at)
        stats.count_request(
            ok, start_ns, decoded_ns, computed_ns, end_ns, rows, batched=loaded.batcher is not None
        )


def _nothing_to_serve(name: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"model {name!r} has no version to serve yet; upload parameters (`paramserve upload "
        f"{name} FILE`) or initialize it (`paramserve init {name} SCHEME`)"
    )


def _example_input(loaded: LoadedModel, rows: int, seed: int = 0):
    """The probe's input: ``rows`` rows along each input's batch dim, free sizes at 1; a
    tensor for one input, a tuple for several."""
    generator = torch.Generator().manual_seed(seed)
    xs = []
    for spec in loaded.signature.inputs:
        sizes = enumerate(spec.shape)
        shape = [rows if d == spec.batch_dim else (s if s >= 0 else 1) for d, s in sizes]
        if spec.dtype.is_floating_point:
            xs.append(torch.randn(shape, generator=generator).to(spec.dtype))
        elif spec.dtype == torch.bool or spec.dtype.is_complex:
            xs.append(torch.zeros(shape, dtype=spec.dtype))
        else:
            xs.append(torch.randint(0, 2, shape, generator=generator, dtype=spec.dtype))
    return xs[0] if len(xs) == 1 else tuple(xs)


def _forward_s(loaded: LoadedModel) -> float:
    """Median time of a forward on the example input (which also warms the module up)."""
    x = _example_input(loaded, 1)
    times = []
    try:
        for _ in range(5):
            start = time.perf_counter()
            loaded.forward_tensor(x)
            times.append(time.perf_counter() - start)
    except Exception:  # a free dim the model cannot take as 1: keep it off the loop
        return float("inf")
    return sorted(times)[len(times) // 2]


def _rows_independent(loaded: LoadedModel) -> bool:
    """Whether two rows run together give the rows each gives alone, for every output: what
    merging requests needs. A model whose forward fails on the probe is left as declared."""
    x = _example_input(loaded, 2, seed=1)
    inputs = loaded.signature.inputs
    try:
        together = _as_tuple(loaded.forward_tensor(x))
        alone = [_as_tuple(loaded.forward_tensor(_row(x, inputs, i))) for i in range(2)]
    except Exception:
        return True
    for k, (out, spec) in enumerate(zip(together, loaded.signature.outputs)):
        dim = spec.batch_dim
        if not isinstance(out, torch.Tensor) or out.dim() <= dim or out.shape[dim] != 2:
            return False
        parts = [a[k] for a in alone]
        if any(p.dim() <= dim or p.shape[dim] != 1 for p in parts):
            return False
        merged = torch.cat(parts, dim)
        if not torch.allclose(merged.float(), out.float(), rtol=1e-3, atol=1e-5):
            return False
    return True


def _as_tuple(y) -> tuple:
    return (y,) if isinstance(y, torch.Tensor) else tuple(y)


def _row(x, inputs, i: int):
    if isinstance(x, torch.Tensor):
        return x.narrow(inputs[0].batch_dim, i, 1)
    return tuple(t.narrow(spec.batch_dim, i, 1) for t, spec in zip(x, inputs))
