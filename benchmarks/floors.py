"""Floors measured in the same run as the figures they judge: a bare gRPC echo server on the
same stack (grpc.aio + the same inference.proto), and a bare streaming server that moves the
same bytes in the same chunks without storing anything.

    python benchmarks/floors.py PORT_FILE [PORT]   # serves until killed; writes its port

With PORT, it joins a floor already on that port (grpc sets SO_REUSEPORT by default): two of
them are the floor of ``serve --workers 2``.
"""

from __future__ import annotations

import asyncio
import sys

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


async def main(port_file: str, port: int = 0) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    registry_pb2_grpc.add_RegistryServicer_to_server(Stream(), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    with open(port_file, "w") as f:
        f.write(str(port))
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
