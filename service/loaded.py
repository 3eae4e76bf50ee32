"""What is loaded, and its one owner: ``LoadedModels``.

A ``LoadedModel`` is a version built, filled and placed on a device. ``LoadedModels`` creates
nothing itself but is the only place that keeps loaded models: the entries keyed by (model,
created_at, version), the hot map from a request's (name, ref) to the entry serving it, the
last-use clock that makes eviction LRU by use, and the byte budget per device. Whatever leaves it
(evicted, retired because no ref serves it any more, unloaded) is freed as soon as the requests
still running on it finish: nothing else holds a loaded model, and a loaded model holds nothing
that points back at it, so its last reference going away frees the module at once (no reference
cycle waiting for the garbage collector), and a finalizer hands the freed heap back to the OS.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import time
import weakref
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch
from torch import nn

from paramserve.registry.errors import ParamserveError
from paramserve.registry.signature import Signature
from paramserve.registry.values import ModelInfo, VersionInfo

from .batcher import Batcher, DeadlineExceeded
from .stats import Duration

log = logging.getLogger("paramserve")

# A forward this short (timed at load) runs on the event loop: cheaper than a thread hop. Any
# input over INLINE_MAX_ELEMENTS goes to the compute thread whatever the timing said, so one large
# request cannot stall every other client's RPCs on the loop.
INLINE_FORWARD_S = 0.0002
INLINE_MAX_ELEMENTS = 1 << 16
# Hot (name, ref) entries kept, for canonical spellings only ("01" resolves through the canonical
# cache instead), so no client can grow the map by inventing spellings of refs.
MAX_HOT_REFS = 4096

Key = tuple  # (model name, model created_at, version number)


class ModelUnavailable(ParamserveError):
    """Explicit model control: the model is not loaded; RepositoryModelLoad makes it ready
    (UNAVAILABLE, as Triton answers)."""


def key_of(model: ModelInfo, version: VersionInfo) -> Key:
    """created_at tells a model from a namesake created after it was deleted (elsewhere)."""
    return (model.name, model.created_at, version.number)


Inputs = torch.Tensor | tuple[torch.Tensor, ...]  # one input, or several in declared order
Outputs = torch.Tensor | tuple[torch.Tensor, ...]


def forward_on(
    module: nn.Module, device: torch.device, x: Inputs, names: tuple[str, ...] = ()
) -> Outputs:
    """One forward on ``device``, output on the CPU: a tensor, or a tuple in the signature's
    order (``names``: what a dict output is read by). A plain function (bound with
    ``functools.partial``) so a batcher can hold it without holding the ``LoadedModel``."""
    with torch.inference_mode():
        if device.type == "cuda":
            y = _forward_on_gpu(module, x, device)
        else:
            y = module(x) if isinstance(x, torch.Tensor) else module(*x)
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        return tuple(y[name] for name in names)
    return tuple(y)


def _forward_on_gpu(module: nn.Module, x: Inputs, device: torch.device):
    """Copies through pinned host buffers: pinned memory is what lets both copies run at full
    PCIe speed (pageable memory is staged through a driver buffer)."""
    xs = (x,) if isinstance(x, torch.Tensor) else x
    on_device = []
    for tensor in xs:
        staged = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        staged.copy_(tensor)
        on_device.append(staged.to(device, non_blocking=True))
    y = module(*on_device)
    if isinstance(y, dict):
        y = {name: _to_host(t) for name, t in y.items()}
    elif isinstance(y, (tuple, list)):
        y = tuple(_to_host(t) for t in y)
    else:
        y = _to_host(y)
    torch.cuda.current_stream(device).synchronize()
    return y


def _to_host(y: torch.Tensor) -> torch.Tensor:
    out = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
    out.copy_(y, non_blocking=True)
    return out


def numel(x: Inputs) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else sum(t.numel() for t in x)


@dataclass(eq=False)
class LoadedModel:
    model: ModelInfo
    version: VersionInfo
    module: nn.Module
    device: torch.device
    signature: Signature
    size_bytes: int
    runner: Executor | None = None  # the device's compute thread
    inline: bool = False  # small inputs run on the event loop (timed at load)
    forward_s: float = float("inf")  # median forward on the example input, timed at load
    batcher: Batcher | None = None
    queue_time: Duration | None = None  # this version's statistics of unbatched queueing
    inflight: int = 0
    last_use: int = 0
    # Canonical refs ("", 3, "production") this entry was served for; rechecked on a change.
    refs: set = field(default_factory=set)
    hot_keys: set = field(default_factory=set)

    @property
    def key(self) -> Key:
        return key_of(self.model, self.version)

    def forward_tensor(self, x: Inputs) -> Outputs:
        return forward_on(self.module, self.device, x, self._output_names())

    def forward_fn(self):
        """The forward as a function that does not reference this object (for the batcher)."""
        return functools.partial(forward_on, self.module, self.device, names=self._output_names())

    def __post_init__(self) -> None:
        self._names = tuple(t.name for t in self.signature.outputs)

    def _output_names(self) -> tuple[str, ...]:
        return self._names

    async def infer(self, x: Inputs, timeout_s: float | None = None) -> Outputs:
        """The forward of one request: batched, inline (small and quick) or on the compute
        thread; time spent waiting for the model is added to ``queue_time``."""
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded("the request's deadline had passed before it could run")
        self.inflight += 1
        try:
            if self.batcher is not None:
                alone = self.batcher.run_alone(x)
                if alone is not None:
                    return alone
                return await self.batcher.submit(x, timeout_s)
            if self.inline and numel(x) <= INLINE_MAX_ELEMENTS:
                if self.queue_time is not None:
                    self.queue_time.add(0)
                return self.forward_tensor(x)
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            queued_ns = time.perf_counter_ns()
            return await asyncio.get_running_loop().run_in_executor(
                self.runner,
                _forward_before,
                self.forward_tensor,
                x,
                deadline,
                queued_ns,
                None if self.queue_time is None else self.queue_time.add,
            )
        finally:
            self.inflight -= 1


def _forward_before(
    forward, x: Inputs, deadline: float | None, queued_ns: int, on_queue_ns
) -> Outputs:
    if on_queue_ns is not None:
        on_queue_ns(time.perf_counter_ns() - queued_ns)
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(
            "the request's deadline passed while it waited for the model; it never ran"
        )
    return forward(x)


class LoadedModels:
    """The one owner of loaded models (see the module docstring)."""

    def __init__(self, budget_bytes: int = 0):
        self.budget_bytes = budget_bytes
        self._entries: dict[Key, LoadedModel] = {}
        self._hot: dict[tuple[str, str], LoadedModel] = {}
        self._clock = 0

    # ---- the hot path ------------------------------------------------------------------
    def hot(self, name: str, ref: str) -> LoadedModel | None:
        loaded = self._hot.get((name, ref))
        if loaded is not None:
            self._clock += 1
            loaded.last_use = self._clock
        return loaded

    def serve(self, name: str, raw_ref: str, canonical_ref, loaded: LoadedModel) -> None:
        """Remember that (name, raw_ref) is served by ``loaded`` until the model changes (the
        caller notes ``canonical_ref`` in ``loaded.refs``, which a change rechecks)."""
        if loaded.key not in self._entries:
            return  # retired while the request loaded it: serve it once, remember nothing
        spelled = "" if canonical_ref is None else str(canonical_ref)
        if raw_ref in (spelled, "latest") and len(self._hot) < MAX_HOT_REFS:
            self._hot[(name, raw_ref)] = loaded
            loaded.hot_keys.add((name, raw_ref))

    # ---- entries -----------------------------------------------------------------------
    def get(self, key: Key) -> LoadedModel | None:
        loaded = self._entries.get(key)
        if loaded is not None:
            self._clock += 1
            loaded.last_use = self._clock
        return loaded

    def add(self, loaded: LoadedModel) -> None:
        """Keep a newly loaded model, then evict the least recently used over the budget."""
        self._clock += 1
        loaded.last_use = self._clock
        self._entries[loaded.key] = loaded
        # On the module, which the batcher's forward also holds: it goes when the last holder
        # does. Weakref callbacks run before the module's tensors are cleared, so the release
        # itself runs on the loop's next turn.
        weakref.finalize(
            loaded.module, _release_soon, asyncio.get_running_loop(), loaded.device.type
        )
        self._evict_over_budget(loaded)

    def all(self) -> list[LoadedModel]:
        return list(self._entries.values())

    def of_model(self, name: str) -> list[LoadedModel]:
        return [m for m in self._entries.values() if m.model.name == name]

    def drop_hot(self, name: str | None = None) -> None:
        """Forget which refs served ``name`` (every model when None): they must be resolved
        again. Entries stay; ``retire`` is what frees them."""
        for key in [k for k in self._hot if name is None or k[0] == name]:
            self._hot.pop(key).hot_keys.discard(key)

    def retire(self, loaded: LoadedModel, why: str) -> None:
        """Stop serving ``loaded``; it is freed when its in-flight requests finish."""
        if self._entries.pop(loaded.key, None) is None:
            return
        for key in loaded.hot_keys:
            self._hot.pop(key, None)
        loaded.hot_keys.clear()
        log.info("unloading %s@%d (%s)", loaded.model.name, loaded.version.number, why)

    def retire_model(self, name: str, why: str) -> int:
        gone = self.of_model(name)
        for loaded in gone:
            self.retire(loaded, why)
        return len(gone)

    def _evict_over_budget(self, newest: LoadedModel) -> None:
        if not self.budget_bytes:
            return
        on_device = sorted(
            (m for m in self._entries.values() if m.device == newest.device),
            key=lambda m: (m.inflight > 0, m.last_use),
        )
        used = sum(m.size_bytes for m in on_device)
        for loaded in on_device:
            if used <= self.budget_bytes:
                break
            if loaded is newest:
                continue  # never the one just loaded: its request is waiting for it
            self.retire(
                loaded, f"least recently used over the {self.budget_bytes >> 20} MiB budget"
            )
            used -= loaded.size_bytes


def _release_soon(loop: asyncio.AbstractEventLoop, device_type: str) -> None:
    if loop.is_closed():
        release_freed_memory(device_type)
    else:
        loop.call_soon_threadsafe(release_freed_memory, device_type)


_libc: ctypes.CDLL | bool | None = None  # False: no C library found


def release_freed_memory(device_type: str = "cpu") -> None:
    """Give memory that freed tensors leave behind back: the CUDA caching allocator's blocks,
    and the C heap's free pages (glibc keeps them otherwise, so RSS would never come down)."""
    global _libc
    if device_type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if isinstance(_libc, ctypes.CDLL) and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
