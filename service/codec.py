"""KServe v2 tensors ⇄ torch tensors: datatypes, raw and typed contents, shape checks.

Raw contents are the fast path: ``numpy.frombuffer`` → ``torch.from_numpy`` wraps the request's
bytes without a copy (about 2 µs, a third of ``torch.frombuffer`` inside a warnings guard), and
outputs go back through ``numpy.tobytes``: one copy, into the reply.
Every problem is an ``InvalidArgument`` that names the tensor and says what was expected.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

from paramserve.registry.errors import InvalidArgument, ResourceExhausted
from paramserve.registry.signature import Signature, TensorSignature
from paramserve.registry.tensorfile import nbytes_of

TORCH_OF: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "UINT16": torch.uint16, "UINT32": torch.uint32,
    "UINT64": torch.uint64, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64,
    "BF16": torch.bfloat16,
}
DATATYPE_OF: dict[torch.dtype, str] = {v: k for k, v in TORCH_OF.items()}
# numpy has no bfloat16: those bytes are read as int16 and reinterpreted by torch.
NUMPY_OF: dict[torch.dtype, np.dtype] = {
    dtype: np.dtype(np.int16) if dtype == torch.bfloat16 else torch.empty(
        0, dtype=dtype).numpy().dtype for dtype in TORCH_OF.values()}
# Request bytes are read-only and the forward never writes its input: torch's one-time
# warning about wrapping a read-only array says nothing a server operator can act on.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
# Which InferTensorContents field carries each datatype (FP16 and BF16 only travel raw).
TYPED_FIELD: dict[str, tuple[str, type]] = {
    "BOOL": ("bool_contents", np.bool_), "INT8": ("int_contents", np.int8),
    "INT16": ("int_contents", np.int16), "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64), "UINT8": ("uint_contents", np.uint8),
    "UINT16": ("uint_contents", np.uint16), "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64), "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
}


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
        raise InvalidArgument(f"raw_input_contents holds {len(raw)} buffers for "
                              f"{len(request.inputs)} inputs; send one per input, in order")
    tensors: dict[str, torch.Tensor] = {}
    for i, tensor in enumerate(request.inputs):
        spec = expected.get(tensor.name)
        if spec is None:
            raise InvalidArgument(f"model {request.model_name!r} has no input {tensor.name!r}; "
                                  f"its inputs: {sorted(expected)}")
        if tensor.name in tensors:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        tensors[tensor.name] = decode_tensor(tensor, raw[i] if raw else None, spec, max_elements)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise InvalidArgument(f"model {request.model_name!r} needs input(s) {missing}")
    return tensors


def decode_tensor(tensor, raw: bytes | None, spec: TensorSignature,
                  max_elements: int) -> torch.Tensor:
    name, datatype = tensor.name, tensor.datatype
    dtype = TORCH_OF.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"input {name!r} has datatype {datatype!r}; paramserve takes "
                              f"{sorted(TORCH_OF)}")
    if dtype != spec.dtype:
        raise InvalidArgument(f"input {name!r} is {datatype}, the model takes "
                              f"{datatype_of(spec.dtype)}")
    shape = tuple(tensor.shape)
    check_shape(name, shape, spec.shape)
    numel = math.prod(shape)  # Python ints: a lying shape cannot overflow into a small number
    if numel > max_elements:
        raise ResourceExhausted(f"input {name!r} has {numel} elements, over the limit of "
                                f"{max_elements}; split the request (--max-tensor-elements)")
    if raw is not None:
        expected_bytes = nbytes_of(dtype, shape)
        if len(raw) != expected_bytes:
            raise InvalidArgument(f"input {name!r}: shape {list(shape)} of {datatype} needs "
                                  f"{expected_bytes} raw bytes, got {len(raw)}")
        if not raw:
            return torch.empty(shape, dtype=dtype)
        tensor = torch.from_numpy(np.frombuffer(raw, dtype=NUMPY_OF[dtype]).reshape(shape))
        return tensor.view(dtype) if dtype == torch.bfloat16 else tensor
    return _decode_typed(tensor, datatype, dtype, shape, numel)


def _decode_typed(tensor, datatype, dtype, shape, numel) -> torch.Tensor:
    name = tensor.name
    if datatype not in TYPED_FIELD:
        raise InvalidArgument(f"input {name!r}: {datatype} has no typed contents field; send it "
                              "in raw_input_contents")
    field, np_type = TYPED_FIELD[datatype]
    values = getattr(tensor.contents, field)
    if len(values) != numel:
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} needs {numel} values in "
                              f"contents.{field}, got {len(values)}")
    array = np.asarray(values)
    if np.issubdtype(np_type, np.integer) and array.size:
        info = np.iinfo(np_type)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidArgument(f"input {name!r}: values out of range for {datatype}")
    return torch.from_numpy(array.astype(np_type).reshape(shape)).to(dtype)


def check_shape(name: str, shape: Sequence[int], expected: Sequence[int]) -> None:
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r} has a negative dimension in {list(shape)}")
    fits = len(shape) == len(expected) and all(e < 0 or e == d for d, e in zip(shape, expected))
    if not fits:
        raise InvalidArgument(f"input {name!r} has shape {list(shape)}, the model takes "
                              f"{list(expected)} (-1: any size)")


def encode_output(response, name: str, tensor: torch.Tensor) -> None:
    """Append one output to the response, its data in raw_output_contents."""
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    datatype = datatype_of(tensor.dtype)
    response.outputs.add(name=name, datatype=datatype, shape=tensor.shape)
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    response.raw_output_contents.append(tensor.detach().numpy().tobytes())
