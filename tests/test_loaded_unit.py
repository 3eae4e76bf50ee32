"""The loaded-model owner and the batcher in-process: no reference cycles, errors reach every
request of a batch, large inputs leave the event loop, refs cached by their canonical form."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from paramserve.registry.errors import InvalidArgument
from paramserve.service.batcher import Batcher, BatchingError
from paramserve.service.loaded import INLINE_MAX_ELEMENTS
from paramserve.service.models import ModelManager
from paramserve.service.placement import Placement

from conftest import reference_module


def run(coro):
    return asyncio.run(coro)


def test_an_output_that_does_not_split_fails_every_request_of_the_batch():
    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(lambda x: x.sum(dim=0, keepdim=True), pool, max_batch_size=8)
            futures = [batcher.submit(torch.ones(2, 3)) for _ in range(3)]  # one batch
            results = await asyncio.wait_for(
                asyncio.gather(*futures, return_exceptions=True), timeout=10)
        return results

    results = run(main())
    assert all(isinstance(r, BatchingError) for r in results), results


def test_an_error_in_a_batched_forward_reaches_every_request():
    def broken(x):
        raise ValueError("boom")

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(broken, pool, max_batch_size=8)
            futures = [batcher.submit(torch.ones(1, 3)) for _ in range(4)]
            return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)

    assert all(isinstance(r, ValueError) for r in run(main()))


@pytest.fixture
def manager(store):
    store.create_model("m", "small_mlp")
    store.upload("m", reference_module("small_mlp", False).state_dict())
    store.upload("m", reference_module("small_mlp", False, seed=2).state_dict())
    executor = ThreadPoolExecutor(2)
    mgr = ModelManager(store, Placement("cpu"), executor)
    yield mgr
    mgr.shutdown()
    executor.shutdown()


def _quiesce(executor: ThreadPoolExecutor) -> None:
    """Every worker of ``executor`` past its last task: a worker thread drops its finished
    task (and so the task's result) only after the waiting coroutine has already woken."""
    workers = executor._max_workers
    barrier = threading.Barrier(workers, timeout=10)
    for done in [executor.submit(barrier.wait) for _ in range(workers)]:
        done.result(timeout=10)


def test_a_retired_model_is_freed_at_once_without_the_garbage_collector(manager):
    async def main():
        loaded = await manager.get("m", "")
        assert loaded.batcher is not None
        await loaded.infer(torch.rand(2, 4))
        module = weakref.ref(loaded.module)
        del loaded
        for executor in [manager.executor, *manager._compute.values()]:
            _quiesce(executor)
        gc.disable()
        try:
            manager.unload("m")
            return module() is None
        finally:
            gc.enable()

    assert run(main())


def test_large_inputs_run_off_the_event_loop_even_for_a_quick_model(manager):
    calls = []

    class Recording(ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            calls.append(fn)
            return super().submit(fn, *args, **kwargs)

    async def main():
        loaded = await manager.get("m", "1")
        loaded.batcher = None  # the unbatched path
        loaded.inline = True
        loaded.runner = Recording(1)
        await loaded.infer(torch.rand(2, 4))
        small = len(calls)
        await loaded.infer(torch.rand(INLINE_MAX_ELEMENTS // 4 + 1, 4))
        loaded.runner.shutdown()
        return small, len(calls)

    assert run(main()) == (0, 1)


def test_refs_are_cached_by_their_canonical_form(manager):
    async def main():
        for spelling in ("2", "02", "002", "0002", "latest", ""):
            await manager.get("m", spelling)
        with pytest.raises(InvalidArgument):
            await manager.resolve("m", "²")
        return {k for k in manager._resolved if k[0] == "m"}, len(manager.cache._hot)

    resolved, hot = run(main())
    assert resolved == {("m", 2), ("m", None)}
    assert hot == 3  # "2", "latest" and "": canonical spellings only


def test_a_version_whose_alias_moved_while_it_loaded_is_retired_once_loaded(manager):
    """The change's recheck ran before the load finished; the load's own recheck retires it."""
    manager.store.set_alias("m", "production", 1)
    release = threading.Event()
    load_blocking = manager._load_blocking

    def slow_load(model, version):
        release.wait(10)
        return load_blocking(model, version)

    manager._load_blocking = slow_load

    async def main():
        request = asyncio.ensure_future(manager.get("m", "production"))
        await asyncio.sleep(0.2)  # resolved to version 1, now loading
        manager.store.set_alias("m", "production", 2)
        manager.forget("m")  # what the Registry servicer does after SetAlias
        release.set()
        first = await request
        for _ in range(100):
            if not manager._rechecks:
                break
            await asyncio.sleep(0.01)
        return first.version.number, [e.version.number for e in manager.loaded()]

    served, loaded = run(main())
    assert served == 1  # the request that raced the move is answered by what it resolved
    assert loaded == []  # and that version, which no ref names now, is not kept
