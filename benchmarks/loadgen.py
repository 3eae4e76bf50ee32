"""Closed-loop ModelInfer load from its own process: CONCURRENCY requests in flight for
DURATION seconds; prints throughput and latency percentiles as JSON.

    python benchmarks/loadgen.py ADDRESS MODEL CONCURRENCY DURATION_S WIDTH [CHANNELS]

CHANNELS (default 1) spreads the requests over that many connections: SO_REUSEPORT (the
server's --workers) balances connections, not requests.
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


if __name__ == "__main__":
    address, model, concurrency, duration, width = sys.argv[1:6]
    channels = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    print(json.dumps(asyncio.run(run(address, model, int(concurrency), float(duration),
                                     int(width), channels))))
