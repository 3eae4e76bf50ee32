"""Floors measured in the same run as the figures they judge: a bare gRPC echo server on the
same stack (grpc.aio + the same inference.proto), a bare streaming server that moves the
same bytes in the same chunks without storing anything, and the yardstick: the thinnest
grpc.aio ModelInfer server that computes (decode, inline forward, encode).

    python benchmarks/floors.py PORT_FILE [PORT] [--inference echo|yardstick]
                                [--loop asyncio|uvloop]   # serves until killed; writes its port

With PORT, it joins a floor already on that port (grpc sets SO_REUSEPORT by default): two of
them are the floor of ``serve --workers 2``. ``--inference yardstick`` serves the peers'
20→256→10 MLP (torch.manual_seed(0), the weights of paramserve's seed-0 sequential_mlp) as
``mlp_small`` (and any other name), one torch thread, with just enough of ModelConfig,
ModelMetadata, ModelReady and ModelStatistics for perf_analyzer and for counting inferences.
``--loop``: the event loop (uvloop: the one paramserve's server can run on).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import warnings

import grpc

from paramserve.protos import inference_pb2 as pb
from paramserve.protos import inference_pb2_grpc
from paramserve.protos import registry_pb2 as rpb
from paramserve.protos import registry_pb2_grpc

OUTPUT_BYTES = 40  # what sequential_mlp answers for one row: 10 float32


class Echo(inference_pb2_grpc.GRPCInferenceServiceServicer):
    async def ModelInfer(self, request, context):
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1")
        response.outputs.add(name="output", datatype="FP32", shape=[1, 10])
        response.raw_output_contents.append(bytes(OUTPUT_BYTES))
        return response


class Stream(registry_pb2_grpc.RegistryServicer):
    """Receives an upload and drops it; sends DownloadVersion requests `chunk_bytes` × N."""

    async def UploadVersion(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        return rpb.Version(number=1)

    async def DownloadVersion(self, request, context):
        chunk = bytes(request.chunk_bytes or (1 << 20))
        total = int(request.ref)
        sent = 0
        yield rpb.DownloadChunk(header=rpb.DownloadHeader(size_bytes=total))
        while sent < total:
            part = chunk[:min(len(chunk), total - sent)]
            sent += len(part)
            yield rpb.DownloadChunk(data=part)


class Yardstick(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """decode the raw input → the forward, inline on the event loop → encode; nothing else
    (no batching, no registry, no checks beyond what the forward needs)."""

    IN, OUT = 20, 10

    def __init__(self):
        import torch
        from torch import nn

        torch.set_num_threads(1)
        torch.manual_seed(0)  # the peers' common/mlp.py build, = sequential_mlp seed 0
        self.torch = torch
        self.module = nn.Sequential(nn.Linear(self.IN, 256), nn.ReLU(),
                                    nn.Linear(256, self.OUT)).eval()
        self.inferences = self.executions = self.ns = 0
        # raw_input_contents are immutable bytes: torch warns once that it will not write them
        warnings.filterwarnings("ignore", message="The given buffer is not writable")

    def answer(self, request) -> pb.ModelInferResponse:
        start = time.perf_counter_ns()
        torch = self.torch
        x = torch.frombuffer(request.raw_input_contents[0], dtype=torch.float32)
        with torch.inference_mode():
            y = self.module(x.view(-1, self.IN))
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1",
                                         id=request.id)
        response.outputs.add(name="output", datatype="FP32", shape=list(y.shape))
        response.raw_output_contents.append(y.numpy().tobytes())
        self.inferences += y.shape[0]
        self.executions += 1
        self.ns += time.perf_counter_ns() - start
        return response

    async def ModelInfer(self, request, context):
        return self.answer(request)

    async def ModelStreamInfer(self, request_iterator, context):
        async for request in request_iterator:
            yield pb.ModelStreamInferResponse(infer_response=self.answer(request))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="yardstick", version="1")

    async def ModelMetadata(self, request, context):
        response = pb.ModelMetadataResponse(name=request.name, versions=["1"],
                                            platform="pytorch")
        response.inputs.add(name="input", datatype="FP32", shape=[-1, self.IN])
        response.outputs.add(name="output", datatype="FP32", shape=[-1, self.OUT])
        return response

    async def ModelConfig(self, request, context):
        config = pb.ModelConfig(name=request.name, platform="pytorch", max_batch_size=64)
        config.input.add(name="input", data_type=pb.TYPE_FP32, dims=[self.IN])
        config.output.add(name="output", data_type=pb.TYPE_FP32, dims=[self.OUT])
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        stats = pb.ModelStatistics(name=request.name or "mlp_small", version="1",
                                   inference_count=self.inferences,
                                   execution_count=self.executions)
        stats.inference_stats.success.count = self.executions
        stats.inference_stats.success.ns = self.ns
        return pb.ModelStatisticsResponse(model_stats=[stats])


async def main(port_file: str, port: int = 0, inference: str = "echo") -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])
    servicer = Yardstick() if inference == "yardstick" else Echo()
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    registry_pb2_grpc.add_RegistryServicer_to_server(Stream(), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    with open(port_file, "w") as f:
        f.write(str(port))
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port_file")
    parser.add_argument("port", nargs="?", type=int, default=0)
    parser.add_argument("--inference", choices=("echo", "yardstick"), default="echo")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    serving = main(args.port_file, args.port, args.inference)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serving)
    else:
        asyncio.run(serving)
