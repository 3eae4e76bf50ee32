"""A new client against a server from before UploadTrailer.crc32c: that server refuses a
trailer without a sha256 (INVALID_ARGUMENT, nothing stored), and the client sends the file
again with the sha256, then keeps sending it to that server."""

from __future__ import annotations

import hashlib
from concurrent import futures

import grpc
import torch

from paramserve.protos import registry_pb2 as pb
from paramserve.protos import registry_pb2_grpc
from paramserve.service.client import NEEDS_SHA256, Client


class OldRegistry(registry_pb2_grpc.RegistryServicer):
    """UploadVersion as servers before the CRC32C trailer answered it."""

    def __init__(self):
        self.streams: list[tuple[bytes, str]] = []  # (the data, the trailer's sha256)

    def UploadVersion(self, request_iterator, context):
        data, sha256 = bytearray(), ""
        for chunk in request_iterator:
            kind = chunk.WhichOneof("kind")
            if kind == "data":
                data += chunk.data
            elif kind == "trailer":
                sha256 = chunk.trailer.sha256
        self.streams.append((bytes(data), sha256))
        if len(sha256) != 64:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, NEEDS_SHA256)
        if hashlib.sha256(data).hexdigest() != sha256:
            context.abort(grpc.StatusCode.DATA_LOSS, "sha256 mismatch")
        return pb.Version(model="m", number=len(self.streams), sha256=sha256,
                          size_bytes=len(data), created_at="2026-12-01T00:00:00+00:00")


def test_a_new_client_uploads_to_an_older_server():
    old = OldRegistry()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    registry_pb2_grpc.add_RegistryServicer_to_server(old, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout_s=30) as client:
            client.upload("m", {"w": torch.arange(6.0)})
            assert len(old.streams) == 2  # refused with a CRC32C, taken with the sha256
            refused, taken = old.streams
            assert refused[1] == "" and refused[0] == taken[0]
            assert taken[1] == hashlib.sha256(taken[0]).hexdigest()
            client.upload("m", {"w": torch.ones(3)})
            assert len(old.streams) == 3 and len(old.streams[2][1]) == 64  # sha256 at once
    finally:
        server.stop(0)
