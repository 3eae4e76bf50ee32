"""Core values ⇄ registry.proto messages, used by the servicer and the client alike.

Importing it needs no torch (the lean client uses the ``*_from_proto`` of plain values); the
tensor and architecture functions import it when called, on the server, where it is loaded.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING

from paramserve.protos import registry_pb2 as pb
from paramserve.registry import tensorfile
from paramserve.registry.errors import InvalidArgument
from paramserve.registry.tensorfile import dtype_name, nbytes_of, tensor_bytes
from paramserve.registry.values import (
    ManifestEntry,
    ModelInfo,
    ParameterInfo,
    TensorSpec,
    TensorStats,
    VersionInfo,
)

if TYPE_CHECKING:
    import torch

    from paramserve.registry.architectures import Architecture


def architecture_to_proto(arch: Architecture) -> pb.Architecture:
    from .codec import datatype_of

    return pb.Architecture(
        name=arch.name,
        doc=arch.doc,
        config_defaults_json=json.dumps(dict(arch.defaults)),
        example_input_shape=list(arch.example_input_shape),
        batchable=arch.batchable,
        input_datatype=datatype_of(arch.input_dtype),
        inputs=[
            pb.TensorDeclaration(
                name=i.name,
                datatype=datatype_of(i.dtype),
                shape=list(i.shape),
                batch_dim=i.batch_dim,
            )
            for i in arch.inputs
        ],
        outputs=list(arch.outputs),
    )


def signature_to_proto(tensors) -> list[pb.TensorDeclaration]:
    """A signature's inputs or outputs (``TensorSignature``s) as registry.proto declarations."""
    from .codec import datatype_of

    return [
        pb.TensorDeclaration(
            name=t.name, datatype=datatype_of(t.dtype), shape=list(t.shape), batch_dim=t.batch_dim
        )
        for t in tensors
    ]


def model_to_proto(info: ModelInfo) -> pb.Model:
    return pb.Model(
        name=info.name,
        architecture=info.architecture,
        config_json=json.dumps(dict(info.config)),
        init=info.init,
        seed=info.seed,
        description=info.description,
        created_at=info.created_at.isoformat(),
        lazy=info.lazy,
        aliases=dict(info.aliases),
        latest_version=info.latest_version or 0,
    )


def model_from_proto(msg: pb.Model) -> ModelInfo:
    return ModelInfo(
        name=msg.name,
        architecture=msg.architecture,
        config=json.loads(msg.config_json or "{}"),
        init=msg.init,
        seed=msg.seed,
        description=msg.description,
        created_at=dt.datetime.fromisoformat(msg.created_at),
        lazy=msg.lazy,
        aliases=dict(msg.aliases),
        latest_version=msg.latest_version or None,
    )


def version_to_proto(info: VersionInfo) -> pb.Version:
    return pb.Version(
        model=info.model,
        number=info.number,
        sha256=info.sha256,
        size_bytes=info.size_bytes,
        origin=info.origin,
        parent=info.parent or 0,
        created_at=info.created_at.isoformat(),
        aliases=list(info.aliases),
        tensors=[
            pb.TensorEntry(
                name=e.name,
                shape=list(e.spec.shape or ()),
                dtype=e.spec.dtype,
                tied_to=e.tied_to or "",
            )
            for e in info.manifest
        ],
        provenance_json=json.dumps(dict(info.provenance), separators=(",", ":")),
        note=info.note,
        author=info.author,
    )


def version_from_proto(msg: pb.Version) -> VersionInfo:
    return VersionInfo(
        model=msg.model,
        number=msg.number,
        sha256=msg.sha256,
        size_bytes=msg.size_bytes,
        origin=msg.origin,
        parent=msg.parent or None,
        created_at=dt.datetime.fromisoformat(msg.created_at),
        manifest=tuple(
            ManifestEntry(t.name, TensorSpec(tuple(t.shape), t.dtype), t.tied_to or None)
            for t in msg.tensors
        ),
        aliases=tuple(msg.aliases),
        provenance=json.loads(msg.provenance_json) if msg.provenance_json else {},
        note=msg.note,
        author=msg.author,
    )


def parameter_to_proto(info: ParameterInfo) -> pb.Parameter:
    msg = pb.Parameter(
        name=info.name,
        shape=list(info.spec.shape or ()),
        dtype=info.spec.dtype,
        kind=info.kind,
        requires_grad=info.requires_grad,
        tied_with=list(info.tied_with),
        initialized=info.initialized,
    )
    if info.stats is not None:
        msg.stats.CopyFrom(
            pb.TensorStats(
                min=info.stats.min, max=info.stats.max, mean=info.stats.mean, std=info.stats.std
            )
        )
    return msg


def parameter_from_proto(msg: pb.Parameter) -> ParameterInfo:
    stats = None
    if msg.HasField("stats"):
        stats = TensorStats(msg.stats.min, msg.stats.max, msg.stats.mean, msg.stats.std)
    return ParameterInfo(
        name=msg.name,
        spec=TensorSpec(tuple(msg.shape) if msg.initialized else None, msg.dtype),
        kind=msg.kind,
        requires_grad=msg.requires_grad,
        tied_with=tuple(msg.tied_with),
        initialized=msg.initialized,
        stats=stats,
    )


def tensor_to_proto(name: str, tensor: torch.Tensor) -> pb.Tensor:
    return pb.Tensor(
        name=name,
        dtype=dtype_name(tensor.dtype),
        shape=list(tensor.shape),
        data=bytes(tensor_bytes(tensor)),
    )


def tensor_from_proto(msg: pb.Tensor) -> torch.Tensor:
    import torch

    dtype = tensorfile.DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidArgument(f"tensor {msg.name!r} has unknown dtype {msg.dtype!r}")
    shape = tuple(msg.shape)
    if nbytes_of(dtype, shape) != len(msg.data):
        raise InvalidArgument(
            f"tensor {msg.name!r}: {len(msg.data)} bytes do not make shape "
            f"{list(shape)} of {msg.dtype}"
        )
    if not msg.data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape)
