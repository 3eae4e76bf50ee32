"""Tensors on the wire ⇄ numpy: the client's codec (no torch), and the tables the server's
torch codec (``codec``) is built from, so both sides read one definition.

A dtype has three names: KServe's ("FP32"), safetensors' and registry.proto's ("F32") and
torch's ("float32"). ``tensorfile.DTYPE_INFO`` gives bytes per element and the torch name of
each safetensors name; ``SAFETENSORS_OF`` maps KServe's names onto those. numpy has no
bfloat16 or float8: such a tensor travels as its bits (``CARRIER``), and ``to_numpy`` widens it
to float32, exactly (every bfloat16 and float8 value is a float32).

>>> wire.add_input(request, "input", np.ones((2, 4), np.float32))
>>> y = wire.to_numpy(*wire.output(response, 0))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from paramserve.registry.errors import InvalidArgument
from paramserve.registry.tensorfile import DTYPE_INFO, ITEMSIZE

SAFETENSORS_OF: dict[str, str] = {
    "BOOL": "BOOL",
    "UINT8": "U8",
    "UINT16": "U16",
    "UINT32": "U32",
    "UINT64": "U64",
    "INT8": "I8",
    "INT16": "I16",
    "INT32": "I32",
    "INT64": "I64",
    "FP16": "F16",
    "FP32": "F32",
    "FP64": "F64",
    "BF16": "BF16",
}
# The numpy dtype whose bytes are each safetensors dtype's bytes; the widened ones carry bits.
CARRIER: dict[str, np.dtype] = {
    name: np.dtype(
        np.int16
        if name == "BF16"
        else np.uint8
        if name.startswith("F8")
        else np.bool_
        if name == "BOOL"
        else attr
    )
    for name, (_, attr) in DTYPE_INFO.items()
}
WIDENED = frozenset({"BF16", "F8_E4M3", "F8_E5M2"})
DATATYPE_OF_NUMPY: dict[np.dtype, str] = {
    CARRIER[st]: kserve for kserve, st in SAFETENSORS_OF.items() if st not in WIDENED
}
DATATYPE_OF_TORCH_NAME: dict[str, str] = {
    DTYPE_INFO[st][1]: kserve for kserve, st in SAFETENSORS_OF.items()
}
# Which InferTensorContents field carries each datatype (FP16 and BF16 only travel raw).
TYPED_FIELD: dict[str, tuple[str, type]] = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int8),
    "INT16": ("int_contents", np.int16),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint8),
    "UINT16": ("uint_contents", np.uint16),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
}


def c_array(x) -> np.ndarray:
    """``x`` as a C-contiguous ndarray; a 0-d one stays 0-d (``np.ascontiguousarray`` would
    make it 1-d, and a state_dict's scalar buffer would no longer fit)."""
    array = np.asarray(x)
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def datatype_of_array(array: np.ndarray) -> str:
    try:
        return DATATYPE_OF_NUMPY[array.dtype]
    except KeyError:
        raise InvalidArgument(
            f"numpy dtype {array.dtype} has no KServe datatype; use one of "
            f"{sorted(str(d) for d in DATATYPE_OF_NUMPY)}"
        ) from None


def check_shape(name: str, shape: Sequence[int], expected: Sequence[int]) -> None:
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r} has a negative dimension in {list(shape)}")
    fits = len(shape) == len(expected) and all(e < 0 or e == d for d, e in zip(shape, expected))
    if not fits:
        raise InvalidArgument(
            f"input {name!r} has shape {list(shape)}, the model takes "
            f"{list(expected)} (-1: any size)"
        )


def decode_typed(tensor, datatype: str, shape: tuple[int, ...], numel: int) -> np.ndarray:
    """A tensor sent in typed ``contents`` instead of raw bytes, checked for count and range."""
    name = tensor.name
    if datatype not in TYPED_FIELD:
        raise InvalidArgument(
            f"input {name!r}: {datatype} has no typed contents field; send it in raw_input_contents"
        )
    field, np_type = TYPED_FIELD[datatype]
    values = getattr(tensor.contents, field)
    if len(values) != numel:
        raise InvalidArgument(
            f"input {name!r}: shape {list(shape)} needs {numel} values in "
            f"contents.{field}, got {len(values)}"
        )
    array = np.asarray(values)
    if np.issubdtype(np_type, np.integer) and array.size:
        info: np.iinfo = np.iinfo(np_type)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidArgument(f"input {name!r}: values out of range for {datatype}")
    return array.astype(np_type).reshape(shape)


def bits(
    dtype_name: str, data, shape: Sequence[int], what: str, shown: str | None = None
) -> np.ndarray:
    """``data`` as an array of ``dtype_name``'s carrier (no copy: read-only for ``bytes``), its
    length checked first; ``shown``: the dtype's name in the error (KServe's for its tensors)."""
    shape = tuple(shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what} has a negative dimension in {list(shape)}")
    expected = math.prod(shape) * ITEMSIZE[dtype_name]
    if len(data) != expected:
        raise InvalidArgument(
            f"{what}: shape {list(shape)} of {shown or dtype_name} needs "
            f"{expected} raw bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=CARRIER[dtype_name]).reshape(shape)


def to_numpy(dtype_name: str, carried: np.ndarray) -> np.ndarray:
    """A carrier array as the values it holds: bfloat16 and float8 widened to float32."""
    if dtype_name == "BF16":
        return (carried.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype_name == "F8_E5M2":  # the top byte of a float16
        return (carried.astype(np.uint16) << 8).view(np.float16).astype(np.float32)
    if dtype_name == "F8_E4M3":
        return _E4M3FN[carried]
    return carried


def _e4m3fn_values() -> np.ndarray:
    """All 256 float8_e4m3fn values: 4 exponent bits (bias 7), 3 mantissa bits, no infinity."""
    b = np.arange(256)
    exponent, mantissa = (b >> 3) & 0xF, (b & 7).astype(np.float64)
    value = np.where(
        exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7)
    )
    value = np.where((exponent == 15) & (mantissa == 7), np.nan, value)
    return np.where(b & 0x80, -value, value).astype(np.float32)


_E4M3FN = _e4m3fn_values()


def add_input(request, name: str, array: np.ndarray, datatype: str | None = None) -> None:
    """Append ``array`` (C-contiguous) as one input, its bytes in raw_input_contents."""
    request.inputs.add(
        name=name, datatype=datatype or datatype_of_array(array), shape=list(array.shape)
    )
    request.raw_input_contents.append(array.tobytes())


def add_torch_input(request, name: str, x, torch) -> None:
    """Append a torch tensor (``torch``: the module, imported by the caller) in its dtype."""
    x = x.detach().cpu().contiguous()
    datatype = DATATYPE_OF_TORCH_NAME.get(str(x.dtype).removeprefix("torch."))
    if datatype is None:
        raise InvalidArgument(f"torch dtype {x.dtype} of input {name!r} has no KServe datatype")
    bits = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
    add_input(request, name, bits.numpy(), datatype)


def output_value(response, index: int, torch=None):
    """Output ``index`` as a writable numpy array (bfloat16 widened), or a torch tensor in its
    own dtype when ``torch`` is given; BYTES (classification strings) as an object array."""
    if response.outputs[index].datatype == "BYTES":
        return bytes_output(response, index)
    dtype_name, carried = output(response, index)
    carried = carried.copy()  # writable, and the response's bytes can go
    if torch is None:
        return to_numpy(dtype_name, carried)
    y = torch.from_numpy(carried)
    return y.view(torch.bfloat16) if dtype_name == "BF16" else y


def bytes_output(response, index: int) -> np.ndarray:
    """A BYTES output: 4-byte little-endian lengths, each followed by its bytes."""
    out = response.outputs[index]
    raw = response.raw_output_contents[index] if len(response.raw_output_contents) > index else b""
    items, at = [], 0
    while at + 4 <= len(raw):
        size = int.from_bytes(raw[at : at + 4], "little")
        items.append(raw[at + 4 : at + 4 + size])
        at += 4 + size
    if at != len(raw) or len(items) != math.prod(out.shape):
        raise InvalidArgument(f"output {out.name!r}: BYTES contents do not match its shape")
    return np.array(items, dtype=object).reshape(tuple(out.shape))


def output(response, index: int) -> tuple[str, np.ndarray]:
    """Output ``index`` of a ModelInferResponse: its safetensors dtype name and carrier array."""
    out = response.outputs[index]
    what = f"output {out.name!r}"
    dtype_name = SAFETENSORS_OF.get(out.datatype)
    if dtype_name is None:
        raise InvalidArgument(
            f"{what} has datatype {out.datatype!r}; paramserve reads {sorted(SAFETENSORS_OF)}"
        )
    raw = response.raw_output_contents
    if len(raw) <= index:
        raise InvalidArgument(f"{what} came without raw_output_contents")
    return dtype_name, bits(dtype_name, raw[index], out.shape, what, out.datatype)


def tensor_from_proto(msg) -> tuple[str, np.ndarray]:
    """A registry.proto ``Tensor``: its dtype name and carrier array."""
    if msg.dtype not in ITEMSIZE:
        raise InvalidArgument(f"tensor {msg.name!r} has unknown dtype {msg.dtype!r}")
    return msg.dtype, bits(msg.dtype, msg.data, msg.shape, f"tensor {msg.name!r}")


def safetensors_name(array: np.ndarray) -> str:
    """The safetensors dtype of a numpy array (one numpy has: not bfloat16 or float8)."""
    return SAFETENSORS_OF[datatype_of_array(array)]
