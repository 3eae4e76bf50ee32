"""KServe v2 tensors ⇄ torch tensors: datatypes, raw and typed contents, shape checks.

Raw contents are the fast path: ``numpy.frombuffer`` → ``torch.from_numpy`` wraps the request's
bytes without a copy (about 2 µs, a third of ``torch.frombuffer`` inside a warnings guard), and
outputs go back through ``numpy.tobytes``: one copy, into the reply.
Every problem is an ``InvalidArgument`` that names the tensor and says what was expected.
"""

from __future__ import annotations

import math
import struct
import warnings

import numpy as np
import torch

from paramserve.registry.errors import InvalidArgument, ResourceExhausted
from paramserve.registry.limits import brief
from paramserve.registry.signature import Signature, TensorSignature
from paramserve.registry.tensorfile import DTYPE_INFO

from .wire import CARRIER, SAFETENSORS_OF, TYPED_FIELD, bits, check_shape, decode_typed

__all__ = [
    "TORCH_OF",
    "DATATYPE_OF",
    "NUMPY_OF",
    "TYPED_FIELD",
    "check_shape",
    "datatype_of",
    "decode_inputs",
    "decode_tensor",
    "encode_classification",
    "encode_output",
]

# The datatype tables are wire's (shared with the numpy-only client), given torch dtypes here.
TORCH_OF: dict[str, torch.dtype] = {
    kserve: getattr(torch, DTYPE_INFO[st][1]) for kserve, st in SAFETENSORS_OF.items()
}
DATATYPE_OF: dict[torch.dtype, str] = {v: k for k, v in TORCH_OF.items()}
# numpy has no bfloat16: those bytes are read as int16 and reinterpreted by torch.
NUMPY_OF: dict[torch.dtype, np.dtype] = {
    dtype: CARRIER[SAFETENSORS_OF[kserve]] for kserve, dtype in TORCH_OF.items()
}
# Request bytes are read-only and the forward never writes its input: torch's one-time
# warning about wrapping a read-only array says nothing a server operator can act on.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def datatype_of(dtype: torch.dtype) -> str:
    try:
        return DATATYPE_OF[dtype]
    except KeyError:
        raise InvalidArgument(f"torch dtype {dtype} has no KServe datatype") from None


def decode_inputs(request, signature: Signature, max_elements: int) -> dict[str, torch.Tensor]:
    """The request's input tensors in the signature's order, checked against it: every missing
    and unexpected name in one error before anything is decoded, then each tensor's datatype,
    shape and size (before it is allocated), then that the inputs agree on their rows."""
    specs = signature.inputs
    raw = request.raw_input_contents
    given = request.inputs
    if raw and len(raw) != len(given):
        raise InvalidArgument(
            f"raw_input_contents holds {len(raw)} buffers for "
            f"{len(given)} inputs; send one per input, in order"
        )
    if len(specs) == 1 and len(given) == 1 and given[0].name == specs[0].name:  # the usual case
        tensor = given[0]
        return {tensor.name: decode_tensor(tensor, raw[0] if raw else None, specs[0], max_elements)}
    position = {t.name: i for i, t in enumerate(given)}
    expected = {t.name for t in specs}
    missing = [t.name for t in specs if t.name not in position]
    unexpected = sorted(set(position) - expected)
    twice = sorted(_repeated(t.name for t in given)) if len(position) < len(given) else []
    if missing or unexpected or twice:
        problems = (
            [f"has no input {brief(n, 60)}" for n in unexpected[:10]]
            + [f"needs input {n!r}" for n in missing]
            + [f"got input {brief(n, 60)} twice" for n in twice[:10]]
        )
        raise InvalidArgument(
            f"model {brief(request.model_name)} {', '.join(problems)}; "
            f"its inputs: {[t.name for t in specs]}"
        )
    tensors = {}
    for spec in specs:
        i = position[spec.name]
        tensors[spec.name] = decode_tensor(given[i], raw[i] if raw else None, spec, max_elements)
    if len(specs) > 1:
        _check_rows(request.model_name, specs, tensors)
    return tensors


def _repeated(names) -> set[str]:
    seen: set[str] = set()
    twice: set[str] = set()
    for name in names:
        (twice if name in seen else seen).add(name)
    return twice


def _check_rows(model: str, specs, tensors: dict[str, torch.Tensor]) -> None:
    """Every input of one request holds the same number of rows along its batch dim."""
    rows = {s.name: tensors[s.name].shape[s.batch_dim] for s in specs if tensors[s.name].dim()}
    if len(set(rows.values())) > 1:
        raise InvalidArgument(
            f"model {model!r}: its inputs must agree on their batch size (rows along each "
            f"one's batch dim), got {rows}"
        )


def decode_tensor(
    tensor, raw: bytes | None, spec: TensorSignature, max_elements: int
) -> torch.Tensor:
    name, datatype = tensor.name, tensor.datatype
    dtype = TORCH_OF.get(datatype)
    if dtype is None:
        raise InvalidArgument(
            f"input {name!r} has datatype {datatype!r}; paramserve takes {sorted(TORCH_OF)}"
        )
    if dtype != spec.dtype:
        raise InvalidArgument(
            f"input {name!r} is {datatype}, the model takes {datatype_of(spec.dtype)}"
        )
    shape = tuple(tensor.shape)
    check_shape(name, shape, spec.shape)
    numel = math.prod(shape)  # Python ints: a lying shape cannot overflow into a small number
    if numel > max_elements:
        raise ResourceExhausted(
            f"input {name!r} has {numel} elements, over the limit of "
            f"{max_elements}; split the request (--max-tensor-elements)"
        )
    if raw is not None:
        carried = bits(SAFETENSORS_OF[datatype], raw, shape, f"input {name!r}", datatype)
        if not raw:
            return torch.empty(shape, dtype=dtype)
        tensor = torch.from_numpy(carried)
        return tensor.view(dtype) if dtype == torch.bfloat16 else tensor
    return torch.from_numpy(decode_typed(tensor, datatype, shape, numel)).to(dtype)


def encode_classification(response, name: str, tensor: torch.Tensor, k: int) -> None:
    """Triton's classification extension: the top ``k`` of each row (the last dims of a
    tensor of 2+ dims, the whole of a 1-d one) as BYTES strings "score:index"."""
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise InvalidArgument(f"output {name!r} is {tensor.dtype}: it cannot be classified")
    rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() >= 2 else tensor.reshape(1, -1)
    k = min(k, rows.shape[1])
    # In float64, as Triton formats (std::to_string: "%f" for floats, digits for integers);
    # every dtype then has a topk, and a float32 prints the same.
    values, indices = torch.topk(rows.double(), k, dim=1)
    floating = tensor.dtype.is_floating_point
    strings = [
        (f"{v:f}:{i}" if floating else f"{int(v)}:{i}").encode()
        for v, i in zip(values.reshape(-1).tolist(), indices.reshape(-1).tolist())
    ]
    shape = [rows.shape[0], k] if tensor.dim() >= 2 else [k]
    response.outputs.add(name=name, datatype="BYTES", shape=shape)
    response.raw_output_contents.append(b"".join(struct.pack("<I", len(s)) + s for s in strings))


def encode_output(response, name: str, tensor: torch.Tensor) -> None:
    """Append one output to the response, its data in raw_output_contents."""
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    datatype = datatype_of(tensor.dtype)
    response.outputs.add(name=name, datatype=datatype, shape=tensor.shape)
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    response.raw_output_contents.append(tensor.detach().numpy().tobytes())
