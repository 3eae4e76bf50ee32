"""KServe v2 tensors ⇄ torch tensors: datatypes, raw and typed contents, shape checks.

Raw contents are the fast path: ``numpy.frombuffer`` → ``torch.from_numpy`` wraps the request's
bytes without a copy (about 2 µs, a third of ``torch.frombuffer`` inside a warnings guard), and
outputs go back through ``numpy.tobytes``: one copy, into the reply.
Every problem is an ``InvalidArgument`` that names the tensor and says what was expected.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from paramserve.registry.errors import InvalidArgument, ResourceExhausted
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
    """The request's input tensors, checked against the model's signature."""
    expected = {t.name: t for t in signature.inputs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents holds {len(raw)} buffers for "
            f"{len(request.inputs)} inputs; send one per input, in order"
        )
    tensors: dict[str, torch.Tensor] = {}
    for i, tensor in enumerate(request.inputs):
        spec = expected.get(tensor.name)
        if spec is None:
            raise InvalidArgument(
                f"model {request.model_name!r} has no input {tensor.name!r}; "
                f"its inputs: {sorted(expected)}"
            )
        if tensor.name in tensors:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        tensors[tensor.name] = decode_tensor(tensor, raw[i] if raw else None, spec, max_elements)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise InvalidArgument(f"model {request.model_name!r} needs input(s) {missing}")
    return tensors


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


def encode_output(response, name: str, tensor: torch.Tensor) -> None:
    """Append one output to the response, its data in raw_output_contents."""
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    datatype = datatype_of(tensor.dtype)
    response.outputs.add(name=name, datatype=datatype, shape=tensor.shape)
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    response.raw_output_contents.append(tensor.detach().numpy().tobytes())
