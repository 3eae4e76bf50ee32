"""A Python client for paramserve: the Registry service and KServe v2 inference over gRPC.

    from paramserve.service.client import Client

    with Client("127.0.0.1:8001") as client:
        client.create_model("mlp", "mlp")
        version = client.upload("mlp", "mlp.safetensors", alias="production")
        y = client.infer("mlp", np.random.rand(2, 20).astype("float32"), ref="production")

It needs numpy and grpc, not torch: importing it never imports torch (a ``.pt`` upload is
read by the server). Torch tensors are taken as they are when the caller uses torch, and
``state_dict()`` (which returns tensors) imports it then. numpy too is imported by the first
call that moves tensors or files, so a process that only lists models never loads it.

Status codes come back as the core's exception classes (``NotFound``, ``InvalidArgument`` …);
other failures (server down, deadline) raise ``ServerError`` with the gRPC code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from paramserve.protos import inference_pb2, inference_pb2_grpc, registry_pb2_grpc
from paramserve.protos import registry_pb2 as pb
from paramserve.registry.errors import DataLoss, InvalidArgument, ParamserveError
from paramserve.registry.values import INPUT_NAME, ModelInfo, ParameterInfo, VersionInfo

from . import convert
from .client_learning import LearningClient
from .client_streams import Progress, Stall, checksummed_upload_chunks, hashed_upload_chunks
from .client_streams import size_and_sha256 as _size_and_sha256  # noqa: F401  (benchmarks)
from .client_streams import upload_chunks as _upload_chunks  # noqa: F401  (benchmarks)
from .status import ERROR_OF

if TYPE_CHECKING:
    import numpy as np
    import torch

# What a server from before UploadTrailer.crc32c answers a trailer with no sha256
# (service/upload_stream.py then); this client then sends the sha256 instead.
NEEDS_SHA256 = "upload trailer needs a 64-hex-digit sha256"


class ServerError(ParamserveError):
    """A failure with no core meaning: unreachable server, deadline, internal error."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self.code = code
        super().__init__(f"{code.name}: {details}")


def _raise_from(err: grpc.RpcError) -> None:
    code, details = err.code(), err.details() or ""
    cls = ERROR_OF.get(code)
    raise (cls(details) if cls else ServerError(code, details)) from None


class Client(LearningClient):
    def __init__(
        self,
        address: str = "127.0.0.1:8001",
        timeout_s: float = 60.0,
        max_message_mb: int = 64,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ):
        """``token``: sent as bearer metadata. ``tls_ca``: a PEM CA file to trust (TLS);
        with ``tls_cert``/``tls_key`` the client presents its own certificate (mutual TLS)."""
        size = max_message_mb << 20
        self.address = address
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._server_needs_sha256 = False  # an older server's uploads: see upload()
        options = [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
        ]
        if tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca),
                private_key=_read(tls_key),
                certificate_chain=_read(tls_cert),
            )
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.registry = registry_pb2_grpc.RegistryStub(self.channel)
        self.inference = inference_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout_s: float | None = None):
        try:
            return method(request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as err:
            _raise_from(err)

    # ---- health ------------------------------------------------------------------------

    def wait_until_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the server answers, or raise ServerError after ``timeout_s``."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise ServerError(
                grpc.StatusCode.UNAVAILABLE,
                f"no paramserve server answered at {self.address} within "
                f"{timeout_s:g} s; start one with `paramserve serve`",
            ) from None
        self._call(self.inference.ServerLive, inference_pb2.ServerLiveRequest(), timeout_s)

    # ---- architectures and models ------------------------------------------------------

    def architectures(self) -> list[pb.Architecture]:
        return list(
            self._call(self.registry.ListArchitectures, pb.ListArchitecturesRequest()).architectures
        )

    def create_model(
        self,
        name: str,
        architecture: str,
        config: Mapping[str, Any] | None = None,
        init: str = "default",
        seed: int = 0,
        description: str = "",
    ) -> ModelInfo:
        msg = self._call(
            self.registry.CreateModel,
            pb.CreateModelRequest(
                name=name,
                architecture=architecture,
                config_json=json.dumps(dict(config or {})),
                init=init,
                seed=seed,
                description=description,
            ),
        )
        return convert.model_from_proto(msg)

    def get_model(self, name: str) -> ModelInfo:
        return convert.model_from_proto(
            self._call(self.registry.GetModel, pb.GetModelRequest(name=name))
        )

    def list_models(self) -> list[ModelInfo]:
        return [
            convert.model_from_proto(m)
            for m in self._call(self.registry.ListModels, pb.ListModelsRequest()).models
        ]

    def delete_model(self, name: str) -> None:
        self._call(self.registry.DeleteModel, pb.DeleteModelRequest(name=name))

    # ---- versions ----------------------------------------------------------------------

    def upload(
        self,
        name: str,
        source,
        alias: str | None = None,
        progress: Progress | None = None,
        timeout_s: float | None = None,
        note: str = "",
    ) -> VersionInfo:
        """Upload a .safetensors / torch.save file (path or bytes) or a dict of torch tensors
        or numpy arrays.

        A file's bytes go as they are (the server reads a torch.save'd one with
        ``weights_only=True``); what its format already shows to be refused (a damaged
        safetensors header or zip archive, a pickled model instead of a state_dict) is
        refused here, before a byte is sent. One pass over the file: its CRC32C is computed
        while it is sent and follows the last chunk in a trailer, which the server checks; the
        server computes the sha256 (the version's content address) itself, so the client does
        not hash. A server from before ``UploadTrailer.crc32c`` refuses that at once; the
        client then sends the file again with the sha256 (and does so for its later
        uploads). The file's name (a path's) and ``note`` are
        recorded with the version, with the sha256 of the bytes sent.
        """
        from paramserve.registry.fileio import keep_freed_memory

        from .client_files import check_upload, upload_path

        keep_freed_memory()  # a transfer's buffers reuse their pages (fileio's docstring)
        with upload_path(source) as (path, label):
            check_upload(path, label)
            size = path.stat().st_size
            header = pb.UploadHeader(
                model=name,
                alias=alias or "",
                size_bytes=size,
                file_name=path.name if isinstance(source, (str, os.PathLike)) else "",
                note=note,
            )
            timeout = timeout_s or max(self.timeout_s, size / (20 << 20))
            if not self._server_needs_sha256:
                try:
                    msg = self._call(
                        self.registry.UploadVersion,
                        checksummed_upload_chunks(path, header, progress),
                        timeout,
                    )
                    return convert.version_from_proto(msg)
                except InvalidArgument as err:
                    if NEEDS_SHA256 not in str(err):
                        raise
                    self._server_needs_sha256 = True  # this client's later uploads hash too
            # A server from before UploadTrailer.crc32c refuses a trailer with no sha256 at
            # once (nothing stored): the same bytes again, hashed as they are sent.
            msg = self._call(
                self.registry.UploadVersion, hashed_upload_chunks(path, header, progress), timeout
            )
        return convert.version_from_proto(msg)

    def download(
        self,
        name: str,
        ref: str | int | None = None,
        path: str | os.PathLike | None = None,
        progress: Progress | None = None,
        as_stored: bool = False,
    ) -> VersionInfo:
        """Save a version to ``path``: ``.safetensors`` (no torch needed), ``.npz`` as numpy
        arrays (``arrays()``'s), ``.pt``/``.pth`` as a torch.save'd state_dict (imports
        torch). Every format holds every state_dict key, so ``net.load_state_dict(...,
        strict=True)`` takes it: a tied name gets a copy of its tensor in safetensors (which
        forbids shared storage; the metadata names the ties) and npz, and shares the one
        tensor in a .pt. A safetensors file with no ties is the stored blob byte for byte;
        ``as_stored`` always saves that blob (tied names once, in its metadata: what
        ``safetensors.torch.save_model`` writes and ``load_model`` reads, strict).
        The sha256 is checked end to end (the client's one hash pass, as each chunk is
        written); a partial file never appears under ``path``. The blob is written to disk
        behind the download (``fileio.Writeback``), so a large one is not left in the page
        cache."""
        from .client_files import read_arrays, write_every_key, write_npz

        if path is None:
            raise InvalidArgument("download needs a path to save the version to")
        target = Path(path)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            blob, out = Path(tmp) / "blob.safetensors", Path(tmp) / "out"
            version = self._download_to(name, ref, blob, progress, writeback=True)
            if as_stored:
                out = blob
            elif target.suffix in (".pt", ".pth"):
                import torch

                torch.save(_read_blob(blob, version.sha256), out)
            elif target.suffix == ".npz":
                with open(out, "wb") as f:
                    write_npz(f, read_arrays(blob, f"download of {name!r}"))
            else:
                with open(out, "wb") as f:
                    expanded = write_every_key(blob, f, f"download of {name!r}")
                if not expanded:
                    out = blob
            os.replace(out, target)
        return version

    def arrays(self, name: str, ref: str | int | None = None) -> dict[str, np.ndarray]:
        """A version's state_dict as numpy arrays, downloaded and sha256-checked; no torch.
        numpy has no bfloat16 or float8: those come widened to float32 (exactly). Tied keys
        share one array."""
        from .client_files import read_arrays

        with tempfile.TemporaryDirectory() as tmp:
            blob = Path(tmp) / "blob.safetensors"
            self._download_to(name, ref, blob, None)
            return read_arrays(blob, f"download of {name!r}")

    def state_dict(self, name: str, ref: str | int | None = None) -> dict[str, torch.Tensor]:
        """A version's state_dict as torch tensors in their stored dtypes; tied keys share one
        tensor. Imports torch (``arrays()`` is the same without it)."""
        with tempfile.TemporaryDirectory() as tmp:
            blob = Path(tmp) / "blob.safetensors"
            version = self._download_to(name, ref, blob, None)
            return _read_blob(blob, version.sha256)

    def _download_to(self, name, ref, path: Path, progress, writeback: bool = False) -> VersionInfo:
        """The stream has no overall deadline (its size is not known when it starts); a
        watchdog cancels it when no chunk arrives for ``timeout_s`` instead. One pass: each
        chunk is hashed and written as it arrives. ``writeback``: write the file to disk
        behind the download and recycle its page cache (``fileio.Writeback``: cheaper for a
        large file, which is then not cached), for a file that is not read back at once."""
        from paramserve.registry.fileio import HashingWriter, keep_freed_memory

        keep_freed_memory()  # a transfer's buffers reuse their pages (fileio's docstring)
        request = pb.DownloadVersionRequest(model=name, ref=_ref(ref))
        version, expected = None, None
        call = self.registry.DownloadVersion(request, timeout=None, metadata=self.metadata)
        out = HashingWriter(path, writeback=writeback)
        try:
            with Stall(call, self.timeout_s) as stall:
                for chunk in call:
                    stall.progress()
                    if chunk.WhichOneof("kind") == "header":
                        version = convert.version_from_proto(chunk.header.version)
                        expected = (chunk.header.sha256, chunk.header.size_bytes)
                        continue
                    out.write(chunk.data)  # read once: each access copies the bytes
                    if progress:
                        progress(out.size, expected[1] if expected else 0)
        except grpc.RpcError as err:
            if stall.fired:
                raise ServerError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"download of {name!r} received nothing for "
                    f"{self.timeout_s:g} s (the client's timeout_s); "
                    "retry, or raise it",
                ) from None
            _raise_from(err)
        finally:
            out.close()
        if version is None or (out.sha256, out.size) != expected:
            raise DataLoss(
                f"download of {name!r} arrived damaged (sha256 "
                f"{out.sha256}, {out.size} bytes; expected {expected}); retry"
            )
        return version

    def list_versions(self, name: str) -> list[VersionInfo]:
        return [
            convert.version_from_proto(v)
            for v in self._call(
                self.registry.ListVersions, pb.ListVersionsRequest(model=name)
            ).versions
        ]

    def delete_version(self, name: str, number: int, force: bool = False) -> list[str]:
        """Delete version ``number``; one that aliases point at is refused
        (``FailedPrecondition`` naming them) unless ``force``, which removes those aliases
        too. Returns the aliases removed."""
        return list(
            self._call(
                self.registry.DeleteVersion,
                pb.DeleteVersionRequest(model=name, number=number, force=force),
            ).removed_aliases
        )

    def set_alias(self, name: str, alias: str, number: int) -> VersionInfo:
        return convert.version_from_proto(
            self._call(
                self.registry.SetAlias, pb.SetAliasRequest(model=name, alias=alias, number=number)
            )
        )

    def delete_alias(self, name: str, alias: str) -> None:
        self._call(self.registry.DeleteAlias, pb.DeleteAliasRequest(model=name, alias=alias))

    # ---- parameters --------------------------------------------------------------------

    def parameters(
        self,
        name: str,
        ref: str | int | None = None,
        stats: bool = False,
        path: str | None = None,
    ) -> list[ParameterInfo]:
        """Every state_dict entry; with ``path`` a state_dict key (that entry) or a submodule
        path (``"2"``: its entries named as ``net[2].state_dict()`` names them, ``weight``,
        ``bias``); neither is ``NotFound`` naming the closest ones."""
        return self._parameters(name, ref, stats, path)[0]

    def module_state(
        self, name: str, path: str, ref: str | int | None = None
    ) -> dict[str, np.ndarray]:
        """``path``'s entries with their values, the guide's ``net[2].state_dict()``: relative
        names for a submodule, the full key for one tensor; each read on its own."""
        infos, module = self._parameters(name, ref, False, path)
        full = (lambda n: f"{module}.{n}") if module else (lambda n: n)
        return {p.name: self.tensor(name, full(p.name), ref) for p in infos}

    def _parameters(self, name, ref, stats, path) -> tuple[list[ParameterInfo], str]:
        msg = self._call(
            self.registry.ListParameters,
            pb.ListParametersRequest(model=name, ref=_ref(ref), stats=stats, path=path or ""),
        )
        return [convert.parameter_from_proto(p) for p in msg.parameters], msg.module

    def tensor(
        self, name: str, param: str, ref: str | int | None = None, index: str | None = None
    ) -> np.ndarray:
        """One parameter (or ``index``'s slice of it) as a numpy array; bfloat16 and float8
        come widened to float32, exactly."""
        from . import wire

        msg = self._call(
            self.registry.GetTensor,
            pb.GetTensorRequest(model=name, ref=_ref(ref), name=param, index=index or ""),
        )
        dtype_name, carried = wire.tensor_from_proto(msg)
        return wire.to_numpy(dtype_name, carried.copy())

    def module_tree(self, name: str, ref: str | int | None = None) -> str:
        return self._call(
            self.registry.DescribeModule, pb.DescribeModuleRequest(model=name, ref=_ref(ref))
        ).tree

    def initialize(
        self,
        name: str,
        scheme: str,
        ref: str | int | None = None,
        module_path: str | None = None,
        seed: int | None = None,
        input_shape: Sequence[int] | None = None,
        note: str = "",
    ) -> VersionInfo:
        request = pb.InitializeRequest(
            model=name,
            ref=_ref(ref),
            scheme=scheme,
            module_path=module_path or "",
            input_shape=list(input_shape or ()),
            note=note,
        )
        if seed is not None:
            request.seed = seed
        return convert.version_from_proto(self._call(self.registry.Initialize, request))

    def patch(
        self,
        name: str,
        param: str,
        value,
        ref: str | int | None = None,
        index: str | None = None,
        op: str = "set",
        note: str = "",
    ) -> VersionInfo:
        from . import wire
        from .client_files import is_torch_tensor

        request = pb.PatchRequest(
            model=name, ref=_ref(ref), param=param, index=index or "", op=op, note=note
        )
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            request.scalar = float(value)
        elif is_torch_tensor(value):
            request.array.CopyFrom(convert.tensor_to_proto(param, value))
        else:
            array = _as_array(value, keep_floats=True)
            request.array.CopyFrom(
                pb.Tensor(
                    name=param,
                    dtype=wire.safetensors_name(array),
                    shape=list(array.shape),
                    data=array.tobytes(),
                )
            )
        return convert.version_from_proto(self._call(self.registry.Patch, request))

    # ---- inference ---------------------------------------------------------------------

    def infer(self, name: str, x, ref: str | int | None = None, timeout_s: float | None = None):
        """One forward pass on the server. ``x``: a numpy array or anything ``np.asarray``
        takes (Python floats become float32, as torch makes them), or a dict of them by
        input name for a model with several inputs. The output is an ``np.ndarray`` (a
        bfloat16 one widened to float32), or a dict by output name when the model has
        several. Torch tensors are sent in their own dtype, bfloat16 included, and the
        outputs come back as torch tensors."""
        from . import wire
        from .client_files import is_torch_tensor, torch_module

        named = dict(x) if isinstance(x, dict) else {INPUT_NAME: x}
        uses_torch = any(is_torch_tensor(v) for v in named.values())
        torch = torch_module() if uses_torch else None
        request = inference_pb2.ModelInferRequest(model_name=name, model_version=_ref(ref))
        for input_name, value in named.items():
            if is_torch_tensor(value):
                wire.add_torch_input(request, str(input_name), value, torch)
            else:
                wire.add_input(request, str(input_name), _as_array(value))
        response = self._call(self.inference.ModelInfer, request, timeout_s)
        if not response.outputs:
            raise InvalidArgument(f"the server answered model {name!r} with no output")
        outputs = {
            out.name: wire.output_value(response, i, torch)
            for i, out in enumerate(response.outputs)
        }
        return next(iter(outputs.values())) if len(outputs) == 1 else outputs

    def model_metadata(self, name: str, ref: str | int | None = None):
        return self._call(
            self.inference.ModelMetadata,
            inference_pb2.ModelMetadataRequest(name=name, version=_ref(ref)),
        )


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _ref(ref: str | int | None) -> str:
    return "" if ref is None else str(ref)


def _as_array(x, keep_floats: bool = False) -> np.ndarray:
    """``x`` as a C-contiguous array; floats given as Python numbers become float32 (the
    dtype models take, as ``torch.as_tensor`` makes them) unless ``keep_floats``, arrays keep
    their dtype."""
    import numpy as np

    from .wire import c_array

    array = c_array(x)
    if array.dtype == np.float64 and isinstance(x, (list, tuple, float)) and not keep_floats:
        array = array.astype(np.float32)
    return array


def _read_blob(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    """The downloaded blob as torch tensors (imports torch: statedict is torch's side)."""
    from paramserve.registry.blobs import VerifyingReader
    from paramserve.registry.statedict import read_state_dict

    with VerifyingReader(open(path, "rb"), sha256, path) as reader:
        return read_state_dict(reader)
