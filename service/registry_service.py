"""The ``paramserve.v1.Registry`` servicer: each RPC decodes, calls the store, encodes.

Blocking store calls run in the worker pool; a change to a model tells the model manager to
forget what it cached about it. Upload streams are read by ``upload_stream``, which hands the
bytes to the store as they arrive.
"""

from __future__ import annotations

import asyncio
import os

from paramserve.protos import registry_pb2 as pb
from paramserve.protos import registry_pb2_grpc
from paramserve.registry import all_architectures
from paramserve.registry.errors import InvalidArgument
from paramserve.registry.fileio import keep_freed_memory
from paramserve.registry.limits import load_config_json
from paramserve.registry.queries import entries_at

from . import convert, registry_learning
from .auth import current_author
from .models import ModelManager
from .upload_stream import receive_upload

DOWNLOAD_CHUNK_BYTES = 1 << 20
MAX_DOWNLOAD_CHUNK_BYTES = 16 << 20


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(
        self,
        manager: ModelManager,
        spool_dir: str,
        max_upload_bytes: int,
        metrics=None,
        stream_idle_timeout_s: float = 0.0,
        max_tensor_elements: int = 1 << 28,
    ):
        self.manager = manager
        self.store = manager.store
        self.spool_dir = spool_dir
        self.max_upload_bytes = max_upload_bytes
        self.metrics = metrics
        self.idle_s = stream_idle_timeout_s
        self.max_tensor_elements = max_tensor_elements  # learning RPCs' inputs, as inference's
        os.makedirs(spool_dir, exist_ok=True)
        keep_freed_memory()  # transfers reuse their buffers' pages (fileio's docstring)

    async def run_blocking(self, fn, *args, **kwargs):
        return await self.manager.run_blocking(lambda: fn(*args, **kwargs))

    async def ListArchitectures(self, request, context):
        return pb.ListArchitecturesResponse(
            architectures=[convert.architecture_to_proto(a) for a in all_architectures()]
        )

    async def CreateModel(self, request, context):
        # size and depth are checked before parsing: deep nesting never reaches json's recursion
        config = (
            load_config_json(request.config_json, self.store.limits) if request.config_json else {}
        )
        info = await self.run_blocking(
            self.store.create_model,
            request.name,
            request.architecture,
            config,
            init=request.init or "default",
            seed=request.seed,
            description=request.description,
        )
        self.manager.forget(request.name)
        return convert.model_to_proto(info)

    async def GetModel(self, request, context):
        return convert.model_to_proto(await self.run_blocking(self.store.get_model, request.name))

    async def ListModels(self, request, context):
        models = await self.run_blocking(self.store.list_models)
        return pb.ListModelsResponse(models=[convert.model_to_proto(m) for m in models])

    async def DeleteModel(self, request, context):
        await self.run_blocking(self.store.delete_model, request.name)
        self.manager.forget(request.name, unload=True)
        return pb.DeleteModelResponse()

    async def UploadVersion(self, request_iterator, context):
        version, size = await receive_upload(
            request_iterator,
            self.store,
            self.run_blocking,
            self.spool_dir,
            self.max_upload_bytes,
            self.idle_s,
            current_author(),
        )
        if self.metrics is not None:
            self.metrics.bytes_moved("upload", size)
        self.manager.forget(version.model)
        return convert.version_to_proto(version)

    async def DownloadVersion(self, request, context):
        chunk_bytes = request.chunk_bytes or DOWNLOAD_CHUNK_BYTES
        if not 0 < chunk_bytes <= MAX_DOWNLOAD_CHUNK_BYTES:
            raise InvalidArgument(f"chunk_bytes must be 1..{MAX_DOWNLOAD_CHUNK_BYTES}")
        version, reader = await self.run_blocking(self.store.open_blob, request.model, request.ref)
        pending: asyncio.Future | None = None
        try:
            yield pb.DownloadChunk(
                header=pb.DownloadHeader(
                    version=convert.version_to_proto(version),
                    sha256=version.sha256,
                    size_bytes=reader.size_bytes,
                )
            )
            # the next chunk is read (and hashed) in the pool while this one is sent; one read
            # at a time, in order; shielded, so a cancelled stream lets a read in flight end
            pending = asyncio.ensure_future(self.run_blocking(reader.read, chunk_bytes))
            while True:
                data = await asyncio.shield(pending)
                if not data:
                    break
                pending = asyncio.ensure_future(self.run_blocking(reader.read, chunk_bytes))
                if self.metrics is not None:
                    self.metrics.bytes_moved("download", len(data))
                yield pb.DownloadChunk(data=data)
            pending = None
            await self.run_blocking(reader.finish)  # DATA_LOSS if the blob changed under us
        finally:
            _close_after(pending, reader)

    async def ListVersions(self, request, context):
        versions = await self.run_blocking(self.store.list_versions, request.model)
        return pb.ListVersionsResponse(versions=[convert.version_to_proto(v) for v in versions])

    async def DeleteVersion(self, request, context):
        removed = await self.run_blocking(
            self.store.delete_version, request.model, request.number, force=request.force
        )
        self.manager.forget(request.model, unload=True)
        return pb.DeleteVersionResponse(removed_aliases=removed)

    async def SetAlias(self, request, context):
        version = await self.run_blocking(
            self.store.set_alias, request.model, request.alias, request.number
        )
        self.manager.forget(request.model)
        return convert.version_to_proto(version)

    async def DeleteAlias(self, request, context):
        await self.run_blocking(self.store.delete_alias, request.model, request.alias)
        self.manager.forget(request.model)
        return pb.DeleteAliasResponse()

    async def ListParameters(self, request, context):
        version = await self.run_blocking(self.store.version_or_none, request.model, request.ref)
        infos = await self.run_blocking(
            self.store.parameters, request.model, request.ref or None, stats=request.stats
        )
        module = ""
        if request.path:  # a key or a submodule path: that entry, or net[2].state_dict()'s
            model = await self.run_blocking(self.store.get_model, request.model)
            infos, module = await self.run_blocking(entries_at, model, infos, request.path)
        return pb.ListParametersResponse(
            version=version.number if version else 0,
            parameters=[convert.parameter_to_proto(p) for p in infos],
            module=module,
        )

    async def GetTensor(self, request, context):
        tensor = await self.run_blocking(
            self.store.tensor,
            request.model,
            request.name,
            request.ref or None,
            index=request.index or None,
        )
        return convert.tensor_to_proto(request.name, tensor)

    async def DescribeModule(self, request, context):
        version = await self.run_blocking(self.store.version_or_none, request.model, request.ref)
        tree = await self.run_blocking(self.store.module_tree, request.model, request.ref or None)
        model = await self.run_blocking(self.store.get_model, request.model)
        signature = await self.run_blocking(self.store.signature, model, version)
        return pb.DescribeModuleResponse(
            version=version.number if version else 0,
            tree=tree,
            inputs=convert.signature_to_proto(signature.inputs),
            outputs=convert.signature_to_proto(signature.outputs),
        )

    async def Initialize(self, request, context):
        version = await self.run_blocking(
            self.store.initialize,
            request.model,
            request.scheme,
            ref=request.ref or None,
            module_path=request.module_path or None,
            seed=request.seed if request.HasField("seed") else None,
            input_shape=tuple(request.input_shape) or None,
            note=request.note,
            author=current_author(),
        )
        self.manager.forget(request.model)
        return convert.version_to_proto(version)

    async def Patch(self, request, context):
        kind = request.WhichOneof("value")
        if kind is None:
            raise InvalidArgument("patch needs a value: a scalar or an array")
        value = request.scalar if kind == "scalar" else convert.tensor_from_proto(request.array)
        version = await self.run_blocking(
            self.store.patch,
            request.model,
            request.param,
            value,
            ref=request.ref or None,
            index=request.index or None,
            op=request.op or "set",
            note=request.note,
            author=current_author(),
        )
        self.manager.forget(request.model)
        return convert.version_to_proto(version)

    # ---- learning RPCs: registry_learning's functions, each taking this servicer ----
    Gradients = registry_learning.gradients
    ApplyUpdate = registry_learning.apply_update
    Train = registry_learning.train
    Diff = registry_learning.diff


def _close_after(pending: asyncio.Future | None, reader) -> None:
    """Close ``reader`` now, or once the read still in flight on it has ended."""

    def close(future: asyncio.Future) -> None:
        if not future.cancelled():
            future.exception()  # a read's error after the stream ended is not news
        reader.close()

    if pending is None:
        reader.close()
    elif pending.done():
        close(pending)
    else:
        pending.add_done_callback(close)
