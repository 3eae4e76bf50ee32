"""Closed-loop ModelInfer load from its own process: CONCURRENCY requests in flight for
DURATION seconds; prints throughput and latency percentiles as JSON.

    python benchmarks/loadgen.py ADDRESS MODEL CONCURRENCY DURATION_S WIDTH [CHANNELS] [MODE]

CHANNELS (default 1) spreads the requests over that many connections: SO_REUSEPORT (the
server's --workers) balances connections, not requests. MODE ``unary`` (default) sends each
request as a ModelInfer call; ``stream`` sends them all on one ModelStreamInfer stream, keeping
CONCURRENCY messages in flight (matched by id), as tritonclient's stream API does.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc
import numpy as np

from paramserve.protos import inference_pb2 as pb
from paramserve.protos import inference_pb2_grpc


async def run(address: str, model: str, concurrency: int, duration_s: float, width: int,
              channels: int = 1):
    x = np.random.default_rng(0).random((1, width), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=[1, width])
    request.raw_input_contents.append(x.tobytes())
    latencies: list[float] = []
    errors = 0
    # A distinct channel argument keeps grpc from sharing one connection between channels.
    opened = [grpc.aio.insecure_channel(address, options=[("paramserve.loadgen.channel", i)])
              for i in range(channels)]
    try:
        stubs = [inference_pb2_grpc.GRPCInferenceServiceStub(c) for c in opened]
        for stub in stubs:
            await stub.ModelInfer(request)  # warm: loaded, connection up
        stop = time.perf_counter() + duration_s

        async def worker(stub):
            nonlocal errors
            while time.perf_counter() < stop:
                start = time.perf_counter()
                try:
                    await stub.ModelInfer(request)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(worker(stubs[i % channels]) for i in range(concurrency)))
        elapsed = time.perf_counter() - began
    finally:
        for channel in opened:
            await channel.close()
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "throughput_rps": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99))}


async def run_stream(address: str, model: str, concurrency: int, duration_s: float, width: int):
    """CONCURRENCY messages in flight on one stream: a new one goes when an answer comes."""
    x = np.random.default_rng(0).random((1, width), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=[1, width])
    request.raw_input_contents.append(x.tobytes())
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(request)  # warm: loaded, connection up
        call = stub.ModelStreamInfer()
        permits = asyncio.Semaphore(concurrency)
        sent: dict[str, float] = {}
        stop = time.perf_counter() + duration_s

        async def write():
            count = 0
            while time.perf_counter() < stop:
                await permits.acquire()
                request.id = str(count)  # serialized by write() before it awaits
                sent[request.id] = time.perf_counter()
                await call.write(request)
                count += 1
            await call.done_writing()

        async def read():
            nonlocal errors
            async for answer in call:
                started = sent.pop(answer.infer_response.id)
                if answer.error_message:
                    errors += 1
                else:
                    latencies.append(time.perf_counter() - started)
                permits.release()

        began = time.perf_counter()
        await asyncio.gather(write(), read())
        elapsed = time.perf_counter() - began
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "throughput_rps": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "mode": "stream"}


if __name__ == "__main__":
    address, model, concurrency, duration, width = sys.argv[1:6]
    channels = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    mode = sys.argv[7] if len(sys.argv) > 7 else "unary"
    if mode == "stream":
        figures = run_stream(address, model, int(concurrency), float(duration), int(width))
    else:
        figures = run(address, model, int(concurrency), float(duration), int(width), channels)
    print(json.dumps(asyncio.run(figures)))
