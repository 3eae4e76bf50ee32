"""The KServe v2 operations, transport-neutral: every front end (gRPC unary and stream, HTTP/REST)
calls these with the protocol's request messages and sends back the response messages, so a
request means the same thing whichever way it came in. Errors are raised as ``ParamserveError``
and mapped to a status code by each front end in one place (gRPC: service/errors.py)."""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from paramserve.protos import inference_pb2 as pb
from paramserve.registry.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ParamserveError,
)
from paramserve.registry.limits import brief
from paramserve.registry.signature import Signature, TensorSignature

from . import codec
from .errors import out_of_memory
from .models import ModelManager

SERVER_NAME = "paramserve"
SERVER_VERSION = "0.1.0"
SHM = "system_shared_memory"  # listed only where --max-shm-regions is not 0
BINARY = "binary_tensor_data"  # HTTP/REST's binary tensors: listed while REST is served
EXTENSIONS = (
    "model_repository",
    "model_configuration",
    "statistics",
    "parameters",
    SHM,
    "classification",  # class_count on a requested output (codec)
    BINARY,
)
PLATFORM = "pytorch"
MAX_CLASS_COUNT = 1 << 16  # a larger class_count is a count of every class anyway
log = logging.getLogger("paramserve")
CONFIG_TYPE = {name: getattr(pb, f"TYPE_{name}") for name in codec.TORCH_OF}


def _tensor_metadata(spec: TensorSignature) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=codec.datatype_of(spec.dtype), shape=list(spec.shape)
    )


class InferenceCore:
    """The server's inference operations over one model manager.

    ``shared_memory``: the registered system shared memory regions (service/shared_memory.py),
    or None when the extension is off."""

    def __init__(
        self,
        manager: ModelManager,
        max_batch_size: int,
        max_tensor_elements: int,
        metrics=None,
        shared_memory=None,
    ):
        self.manager = manager
        self.shared_memory = shared_memory
        self.rest_served = False  # set by service/http_server.py once --http-listen serves
        self.max_batch_size = max_batch_size
        self.max_tensor_elements = max_tensor_elements
        self.metrics = metrics

    async def server_live(self, request):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request):
        return pb.ServerReadyResponse(ready=True)

    async def model_ready(self, request):
        """Ready when it can answer now: a stored version, or a lazy model's first request."""
        try:
            model = await self.manager.model(request.name)
            version = await self.manager.resolve(request.name, request.version)
        except (NotFound, InvalidArgument):
            return pb.ModelReadyResponse(ready=False)
        if not self.manager.is_available(request.name):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(
            ready=version is not None or (model.lazy and not request.version)
        )

    async def server_metadata(self, request):
        off = {SHM} if self.shared_memory is None else set()
        off |= set() if self.rest_served else {BINARY}
        extensions = [e for e in EXTENSIONS if e not in off]
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=extensions
        )

    async def model_metadata(self, request):
        model, version, signature = await self.manager.signature(request.name, request.version)
        versions = await self.manager.run_blocking(self.manager.store.list_versions, request.name)
        device = await self._device_of(request.name, version)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v.number) for v in versions],
            platform=PLATFORM,
            inputs=[_tensor_metadata(t) for t in signature.inputs],
            outputs=[_tensor_metadata(t) for t in signature.outputs],
            parameters={"device": pb.InferParameter(string_param=device)},
        )

    async def _device_of(self, name, version) -> str:
        """Where the version runs: its device once loaded, else where placement would put it."""
        for loaded in self.manager.loaded():
            if version is not None and (loaded.model.name, loaded.version.number) == (
                name,
                version.number,
            ):
                return str(loaded.device)
        return str(self.manager.placement.choose(version.size_bytes if version else 0))

    async def model_config(self, request):
        model, version, signature = await self.manager.signature(request.name, request.version)
        # Triton's dims leave the batch dim out, and it must be the first: a model batched
        # along another dim is described with its full shapes and max_batch_size 0.
        leading = all(t.batch_dim == 0 for t in (*signature.inputs, *signature.outputs))
        max_batch, _ = self.manager.batching_for(model.name)
        batch = max_batch if signature.batchable and leading and max_batch > 1 else 0
        config = pb.ModelConfig(
            name=model.name, platform=PLATFORM, backend="paramserve", max_batch_size=batch
        )
        skip = 1 if batch > 0 else 0  # Triton's dims leave the batch dimension out
        for spec in signature.inputs:
            config.input.add(
                name=spec.name,
                dims=list(spec.shape[skip:]),
                data_type=CONFIG_TYPE[codec.datatype_of(spec.dtype)],
            )
        for spec in signature.outputs:
            dims = list(spec.shape[skip:]) if spec.shape else []
            config.output.add(
                name=spec.name, dims=dims, data_type=CONFIG_TYPE[codec.datatype_of(spec.dtype)]
            )
        config.parameters["architecture"].string_value = model.architecture
        config.parameters["device"].string_value = await self._device_of(model.name, version)
        return pb.ModelConfigResponse(config=config)

    async def infer(self, request, time_remaining: float | None = None):
        """The hot path: one dict lookup, a zero-copy decode, the forward (batched or not),
        raw bytes out. SQL and the store are touched only the first time (``_load_for``).
        The codec checks every input against the signature first, so a forward that fails on
        what it accepted is the model's fault (INTERNAL), not the caller's."""
        start = time.perf_counter_ns()
        if self.shared_memory is not None:
            request = self.shared_memory.read_inputs(request)
        loaded = self.manager.hot(request.model_name, request.model_version)
        if loaded is None:
            loaded = await self._load_for(request)
        signature = loaded.signature
        try:
            inputs = codec.decode_inputs(request, signature, self.max_tensor_elements)
            requested = _requested_outputs(request, signature)
            decoded = time.perf_counter_ns()
            x = next(iter(inputs.values())) if len(inputs) == 1 else tuple(inputs.values())
            try:
                y = await loaded.infer(x, time_remaining)
            except (ParamserveError, asyncio.CancelledError):
                raise
            except Exception as err:
                if out_of_memory(err):
                    raise  # RESOURCE_EXHAUSTED, by the one table (service/errors.py)
                raise _model_failed(loaded, err) from err
            ys = (y,) if isinstance(y, torch.Tensor) else y
            if len(ys) != len(signature.outputs):
                raise ModelFailed(
                    f"model {loaded.model.name!r} returned {len(ys)} outputs where its "
                    f"signature has {len(signature.outputs)}"
                )
            computed = time.perf_counter_ns()
            response = pb.ModelInferResponse(
                model_name=loaded.model.name,
                model_version=str(loaded.version.number),
                id=request.id,
            )
            for name, index, class_count in requested:
                if class_count:
                    codec.encode_classification(response, name, ys[index], class_count)
                else:
                    codec.encode_output(response, name, ys[index])
        except Exception:
            self.manager.record(loaded, False, start, start, start, time.perf_counter_ns())
            raise
        first, spec = (x if isinstance(x, torch.Tensor) else x[0]), signature.inputs[0]
        rows = first.shape[spec.batch_dim] if first.dim() and signature.batchable else 1
        self.manager.record(
            loaded, True, start, decoded, computed, time.perf_counter_ns(), rows=rows
        )
        if self.metrics is not None:
            self.metrics.bytes_moved("infer_in", sum(t.nbytes for t in inputs.values()))
            self.metrics.bytes_moved("infer_out", sum(t.nbytes for t in ys))
        if self.shared_memory is not None:
            self.shared_memory.write_outputs(request, response)
        return response

    async def _load_for(self, request):
        """The slow path: resolve, maybe create a lazy model's first version, load."""
        input_shape = tuple(request.inputs[0].shape) if request.inputs else None
        version = await self.manager.resolve(request.model_name, request.model_version)
        if version is None:  # a lazy model's first request: check it before it makes a version
            _, _, signature = await self.manager.signature(request.model_name, "")
            codec.decode_inputs(request, signature, self.max_tensor_elements)
        return await self.manager.get(request.model_name, request.model_version, input_shape)

    async def model_statistics(self, request):
        created_at = None
        if request.name:
            created_at = (await self.manager.model(request.name)).created_at  # NOT_FOUND
        response = pb.ModelStatisticsResponse()
        for (name, number), stats in self.manager.stats.items(request.name, created_at):
            if request.version and request.version != str(number):
                continue
            entry = response.model_stats.add(
                name=name,
                version=str(number),
                last_inference=stats.last_inference_ms,
                inference_count=stats.inference_count,
                execution_count=stats.execution_count,
            )
            for field in (
                "success",
                "fail",
                "queue",
                "compute_input",
                "compute_infer",
                "compute_output",
            ):
                duration = getattr(stats, field)
                getattr(entry.inference_stats, field).CopyFrom(
                    pb.StatisticDuration(count=duration.count, ns=duration.ns)
                )
            for rows, forwards in sorted(stats.batch_rows.items()):
                entry.batch_stats.add(
                    batch_size=rows,
                    compute_infer=pb.StatisticDuration(count=forwards.count, ns=forwards.ns),
                )
        if request.name and not response.model_stats:
            model, version, _ = await self.manager.signature(request.name, request.version)
            response.model_stats.add(
                name=model.name, version=str(version.number) if version else ""
            )
        return response

    async def repository_index(self, request):
        models = await self.manager.run_blocking(self.manager.store.list_models)
        response = pb.RepositoryIndexResponse()
        loaded = {m.model.name for m in self.manager.loaded()}
        for model in models:
            servable = model.latest_version is not None or model.lazy
            ready = servable and self.manager.is_available(model.name)
            if request.ready and not ready:
                continue
            if not servable:
                reason = "no version yet: upload or init one"
            elif not ready:
                reason = "unloaded: load it with RepositoryModelLoad"
            else:
                reason = "loaded" if model.name in loaded else ""
            response.models.add(
                name=model.name,
                version=str(model.latest_version or ""),
                state="READY" if ready else "UNAVAILABLE",
                reason=reason,
            )
        return response

    async def repository_model_load(self, request):
        parameters = {key: value.string_param for key, value in request.parameters.items()}
        await self.manager.load_for_repository(request.model_name, parameters)
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(self, request):
        await self.manager.model(request.model_name)
        self.manager.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # Triton's system shared memory extension (service/shared_memory.py)
    async def system_shared_memory_register(self, request):
        regions = self._shared_memory()
        regions.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def system_shared_memory_status(self, request):
        return self._shared_memory().status(request.name)

    async def system_shared_memory_unregister(self, request):
        self._shared_memory().unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    def _shared_memory(self):
        if self.shared_memory is None:
            raise FailedPrecondition(
                "system shared memory is off on this server (--max-shm-regions 0)"
            )
        return self.shared_memory


def _requested_outputs(request, signature: Signature) -> list[tuple[str, int, int]]:
    """(name, index in the forward's outputs, class_count: 0 for the tensor itself) of each
    output to send: all of them when none is named."""
    if not request.outputs:
        return [(t.name, i, 0) for i, t in enumerate(signature.outputs)]
    index = signature.output_index()
    unknown = sorted({o.name for o in request.outputs if o.name not in index})
    if unknown:
        raise InvalidArgument(
            f"model {request.model_name!r} has no output(s) {brief(unknown[:10], 200)}; "
            f"its outputs: {list(index)}"
        )
    if len(request.outputs) > len(index):
        raise InvalidArgument(
            f"{len(request.outputs)} outputs requested, model {request.model_name!r} has "
            f"{len(index)}: name each once"
        )
    return [(o.name, index[o.name], _class_count(o)) for o in request.outputs]


def _class_count(requested) -> int:
    """Triton's classification extension: the output's ``classification`` parameter
    (int64, as tritonclient's ``InferRequestedOutput(name, class_count=k)`` sends it)."""
    if "classification" not in requested.parameters:
        return 0
    param = requested.parameters["classification"]
    kind = param.WhichOneof("parameter_choice")
    value = param.int64_param if kind == "int64_param" else param.uint64_param
    if kind not in ("int64_param", "uint64_param") or value < 0:
        raise InvalidArgument(
            f"output {brief(requested.name)}: parameter 'classification' must be a "
            "non-negative int64 (the number of classes to return)"
        )
    return min(value, MAX_CLASS_COUNT)


class ModelFailed(ParamserveError):
    """The forward failed on an input its signature accepts: a bug in the model or its
    architecture, not in the request (INTERNAL, logged with the model's name)."""


def _model_failed(loaded, err: BaseException) -> ModelFailed:
    name = loaded.model.name
    log.error(
        "model %r version %d failed on an input its signature accepts",
        name,
        loaded.version.number,
        exc_info=err,
    )
    return ModelFailed(
        f"model {name!r} failed on an input its signature accepts "
        f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}); "
        "this is a bug in the model or its architecture"
    )
