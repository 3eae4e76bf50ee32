"""Dynamic batching: merges what queues while the model is busy, splits the answer back,
never merges non-batchable models, refuses when full, and never runs expired requests."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from paramserve.protos import inference_pb2 as pb
from paramserve.protos import inference_pb2_grpc
from paramserve.registry import ResourceExhausted
from paramserve.service.batcher import Batcher, DeadlineExceeded

from conftest import reference_module


class SlowModel:
    """Doubles its input after ``delay_s``; records the batch sizes it saw."""

    def __init__(self, delay_s: float = 0.05):
        self.delay_s = delay_s
        self.batches: list[tuple[int, ...]] = []

    def __call__(self, x):
        time.sleep(self.delay_s)
        self.batches.append(tuple(x.shape))
        return x * 2


def run(coro):
    return asyncio.run(coro)


def make_batcher(model, **kwargs):
    return Batcher(model, ThreadPoolExecutor(1), **kwargs)


def test_requests_queued_while_busy_run_as_one_batch_and_split_back():
    model = SlowModel()

    async def scenario():
        batcher = make_batcher(model, max_batch_size=64)
        xs = [torch.full((i + 1, 3), float(i)) for i in range(6)]
        first = asyncio.ensure_future(batcher.submit(xs[0]))
        await asyncio.sleep(0.01)  # the model is now busy with the first
        results = await asyncio.gather(first, *(batcher.submit(x) for x in xs[1:]))
        return xs, results

    xs, results = run(scenario())
    assert all(torch.equal(r, x * 2) for x, r in zip(xs, results))
    assert model.batches[0] == (1, 3)              # the first ran alone, at once
    assert model.batches[1] == (2 + 3 + 4 + 5 + 6, 3)  # the rest queued behind it: one batch


def test_max_batch_size_and_trailing_shapes_split_batches():
    model = SlowModel(0.02)

    async def scenario():
        batcher = make_batcher(model, max_batch_size=4)
        xs = [torch.ones(1, 3)] + [torch.ones(2, 3)] * 3 + [torch.ones(2, 5)]
        return await asyncio.gather(*(batcher.submit(x) for x in xs))

    results = run(scenario())
    assert [r.shape for r in results][-1] == (2, 5)
    assert all(rows <= 4 for rows, _ in model.batches)
    assert (2, 5) in model.batches  # a different width never shares a forward


def test_a_full_queue_is_refused_at_once():
    model = SlowModel(0.2)

    async def scenario():
        batcher = make_batcher(model, max_batch_size=1, max_queue_size=2)
        first = asyncio.ensure_future(batcher.submit(torch.ones(1, 1)))
        await asyncio.sleep(0.05)  # the first is running; two may wait
        waiting = [asyncio.ensure_future(batcher.submit(torch.ones(1, 1))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="queue is full"):
            batcher.submit(torch.ones(1, 1))  # refused on the spot: no await, no waiting
        await asyncio.gather(first, *waiting)

    run(scenario())


def test_an_expired_request_never_runs():
    model = SlowModel(0.2)

    async def scenario():
        batcher = make_batcher(model, max_batch_size=8)
        first = asyncio.ensure_future(batcher.submit(torch.ones(1, 1)))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(torch.full((1, 1), 7.0), timeout_s=0.01)
        await first

    run(scenario())
    assert model.batches == [(1, 1)]  # the expired one was dropped before any forward


def batch_stats(channel, name):
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=name)).model_stats[0]
    return stats


def concurrent_infer(client, name, x, n):
    threads = [threading.Thread(target=client.infer, args=(name, x)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_server_batches_batchable_models_and_never_the_others(client, model_name):
    client.create_model(model_name, "sequential_mlp", {"hidden": 4096})
    client.upload(model_name, _wide_state())
    concurrent_infer(client, model_name, torch.rand(1, 20), 48)
    stats = batch_stats(client.channel, model_name)
    assert stats.inference_count == 48 and stats.execution_count < 48
    assert any(b.batch_size > 1 for b in stats.batch_stats)
    scalar = model_name + "-scalar"
    client.create_model(scalar, "fixed_hidden_mlp")
    client.upload(scalar, reference_module("fixed_hidden_mlp", False).state_dict())
    concurrent_infer(client, scalar, torch.rand(2, 20), 24)
    stats = batch_stats(client.channel, scalar)
    assert stats.execution_count == 24 and list(stats.batch_stats) == []


def _wide_state():
    from paramserve.registry import get_architecture
    return get_architecture("sequential_mlp").build({"hidden": 4096}, seed=0).state_dict()


def test_requests_arriving_alone_skip_the_queue_and_company_brings_it_back():
    from paramserve.service.batcher import LONELY_BATCHES, PROBE_EVERY

    seen = []

    def forward(x):
        seen.append(x.shape[0])
        return x + 1

    async def scenario():
        # Batches of up to 64 elements run on the loop; larger ones on the executor.
        batcher = Batcher(forward, ThreadPoolExecutor(1), max_batch_size=64,
                          inline_max_elements=64)
        x = torch.ones(1, 2)
        assert batcher.run_alone(x) is None  # no history yet: through the queue
        for _ in range(LONELY_BATCHES):
            assert torch.equal(await batcher.submit(x), x + 1)
        ran_at_once = [batcher.run_alone(x) is not None for _ in range(PROBE_EVERY)]
        assert ran_at_once.count(False) == 1  # one probe goes through the queue
        # Company: requests submitted in the same turn of the loop share one forward again.
        together = await asyncio.gather(*(batcher.submit(torch.full((1, 2), float(i)))
                                          for i in range(5)))
        assert [t.item() for t in torch.cat(together)[:, 0]] == [1, 2, 3, 4, 5]
        assert seen[-1] == 5
        assert batcher.run_alone(x) is None  # company was found: back to queueing
        for _ in range(LONELY_BATCHES):
            await batcher.submit(x)
        assert batcher.run_alone(torch.ones(1, 65)) is None  # too large for the loop

    run(scenario())
