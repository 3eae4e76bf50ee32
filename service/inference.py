"""The KServe v2 gRPC servicer: each RPC is one call into the transport-neutral InferenceCore."""

from __future__ import annotations

import contextlib

from paramserve.protos import inference_pb2_grpc

from .inference_core import EXTENSIONS, PLATFORM, SERVER_NAME, SERVER_VERSION, InferenceCore
from .inference_stream import StreamLimits, stream_infer

__all__ = ["EXTENSIONS", "PLATFORM", "SERVER_NAME", "SERVER_VERSION", "InferenceServicer"]


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: InferenceCore, stream_limits: StreamLimits | None = None):
        self.core = core
        self.stream_limits = stream_limits or StreamLimits()

    async def ServerLive(self, request, context):
        return await self.core.server_live(request)

    async def ServerReady(self, request, context):
        return await self.core.server_ready(request)

    async def ModelReady(self, request, context):
        return await self.core.model_ready(request)

    async def ServerMetadata(self, request, context):
        return await self.core.server_metadata(request)

    async def ModelMetadata(self, request, context):
        return await self.core.model_metadata(request)

    async def ModelConfig(self, request, context):
        return await self.core.model_config(request)

    async def ModelInfer(self, request, context):
        return await self.core.infer(request, context.time_remaining())

    async def ModelStreamInfer(self, request_iterator, context):
        """Each message a ModelInfer, served concurrently (service/inference_stream.py)."""
        responses = stream_infer(self.core, self.stream_limits, request_iterator, context)
        async with contextlib.aclosing(responses):
            async for response in responses:
                yield response

    async def ModelStatistics(self, request, context):
        return await self.core.model_statistics(request)

    async def RepositoryIndex(self, request, context):
        return await self.core.repository_index(request)

    async def RepositoryModelLoad(self, request, context):
        return await self.core.repository_model_load(request)

    async def RepositoryModelUnload(self, request, context):
        return await self.core.repository_model_unload(request)

    async def SystemSharedMemoryStatus(self, request, context):
        return await self.core.system_shared_memory_status(request)

    async def SystemSharedMemoryRegister(self, request, context):
        return await self.core.system_shared_memory_register(request)

    async def SystemSharedMemoryUnregister(self, request, context):
        return await self.core.system_shared_memory_unregister(request)
