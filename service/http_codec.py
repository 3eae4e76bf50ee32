"""KServe v2 REST bodies ⇄ the inference messages InferenceCore takes and returns.

JSON tensors (``data`` flat or nested, in row-major order) become raw little-endian bytes, as
the gRPC fast path sends them, so the core sees one kind of request whichever way it came.
Triton's binary-data extension is read and written as ``tritonclient.http`` does: the body
is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the tensors' bytes,
each input's length in its ``binary_data_size`` parameter; an output is answered in binary
when its ``binary_data`` parameter (else the request's ``binary_data_output``) says so.

Every problem is an ``InvalidArgument`` naming the tensor or field and what was expected.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import numpy as np

from paramserve.protos import inference_pb2 as pb
from paramserve.registry.errors import InvalidArgument, ResourceExhausted
from paramserve.registry.limits import Limits, check_json_depth

from .wire import CARRIER, SAFETENSORS_OF, to_numpy

HEADER_LENGTH = "Inference-Header-Content-Length"
# The numpy type JSON values of each datatype are converted to (BF16: via float32).
_JSON_NUMPY = {k: CARRIER[v] for k, v in SAFETENSORS_OF.items() if k != "BF16"}
_KIND_OK = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}  # a datatype's kind → JSON kinds it takes
_INT64 = (-(1 << 63), (1 << 63) - 1)
_SHM_KEY = "shared_memory_region"


def loads(raw: bytes, what: str, limits: Limits) -> Any:
    """Parse a JSON body, its depth checked first (``--max-json-depth``), so a deeply nested
    body is a 400 before the parser recurses into it. The C parser, no per-number hooks:
    a tensor's millions of numbers are checked by numpy afterwards."""
    if raw.count(b"[") + raw.count(b"{") > limits.max_json_depth:  # else it cannot be deep
        check_json_depth(raw, what, limits)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise InvalidArgument(f"{what} is not valid JSON: {str(err)[:120]}") from None
    except RecursionError:  # pragma: no cover  (the depth check comes first)
        raise InvalidArgument(f"{what} is nested too deeply") from None


def json_object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def set_parameters(target, parameters: Any, what: str) -> None:
    """JSON ``parameters`` → a map of InferParameter (bool, int64/uint64, double, string)."""
    for key, value in json_object(parameters, f"{what} parameters").items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            if _INT64[0] <= value <= _INT64[1]:
                param.int64_param = value
            elif 0 <= value < 1 << 64:
                param.uint64_param = value
            else:
                raise InvalidArgument(f"{what} parameter {key!r} does not fit in 64 bits")
        elif isinstance(value, float):
            param.double_param = value
        elif isinstance(value, str):
            param.string_param = value
        else:
            raise InvalidArgument(
                f"{what} parameter {key!r} must be a bool, number or string, "
                f"not {type(value).__name__}"
            )


def parameters_json(parameters) -> dict:
    """A map of InferParameter (or ModelRepositoryParameter) → plain JSON values."""
    out = {}
    for key, param in parameters.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(param, choice)
    return out


def _binary_parameter(parameters: dict, default: bool) -> bool:
    value = parameters.get("binary_data", default)
    if not isinstance(value, bool):
        raise InvalidArgument("the 'binary_data' parameter must be true or false")
    return value


class JsonTooLarge(ResourceExhausted):
    """An inference request's JSON part over ``--http-max-json-mb`` (HTTP 413, not 429: a
    retry of the same body cannot succeed)."""


def infer_request(
    body: bytes,
    header_length: str | None,
    name: str,
    version: str,
    limits: Limits,
    max_json_bytes: int = 16 << 20,
) -> tuple[pb.ModelInferRequest, bool, dict[str, bool]]:
    """The request message, the request's ``binary_data_output`` and each requested
    output's ``binary_data`` choice. The JSON part is refused past ``max_json_bytes`` before
    it is parsed (``--http-max-json-mb``): parsed, each number is a Python object."""
    binary: bytes | memoryview
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} is {header_length[:24]!r}: it must be the JSON header's "
                f"length in bytes, at most the body's {len(body)}"
            )
        size = int(header_length)
        header, binary = body[:size], memoryview(body)[size:]
    if len(header) > max_json_bytes:
        raise JsonTooLarge(
            f"the request's JSON is {len(header)} bytes, over the limit of {max_json_bytes} "
            "(--http-max-json-mb); send tensors as binary data (Triton's binary_data "
            "extension), over gRPC or through shared memory"
        )
    doc = json_object(loads(header, "the inference request", limits), "the inference request")
    request = pb.ModelInferRequest(model_name=name, model_version=version)
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("the request's 'id' must be a string")
    request.id = request_id
    parameters = json_object(doc.get("parameters", {}), "the request's parameters")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidArgument("the 'binary_data_output' parameter must be true or false")
    set_parameters(
        request.parameters,
        {k: v for k, v in parameters.items() if k != "binary_data_output"},
        "the request's",
    )
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("the request needs 'inputs': a list of tensors")
    offset = 0
    for item in inputs:
        offset = _add_input(request, json_object(item, "each input"), binary, offset, limits)
    if offset != len(binary):
        raise InvalidArgument(
            f"the body holds {len(binary) - offset} bytes after the tensors its "
            "'binary_data_size' parameters account for"
        )
    binary_of: dict[str, bool] = {}
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument("'outputs' must be a list of {\"name\": ...} objects")
    for item in outputs:
        item = json_object(item, "each requested output")
        out_name = item.get("name")
        if not isinstance(out_name, str):
            raise InvalidArgument("each requested output needs a 'name' string")
        out_params = dict(json_object(item.get("parameters", {}), f"output {out_name!r}'s"))
        binary_of[out_name] = _binary_parameter(out_params, binary_output)
        out_params.pop("binary_data", None)
        requested = request.outputs.add(name=out_name)
        set_parameters(requested.parameters, out_params, f"output {out_name!r}'s")
    return request, binary_output, binary_of


def _add_input(request, item: dict, binary: memoryview | bytes, offset: int, limits) -> int:
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str):
        raise InvalidArgument("each input needs a 'name' string")
    if not isinstance(datatype, str):
        raise InvalidArgument(f"input {name!r} needs a 'datatype' string such as \"FP32\"")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _INT64[1] for d in shape
    ):
        raise InvalidArgument(f"input {name!r} needs a 'shape': a list of sizes >= 0")
    if len(shape) > limits.max_input_rank:
        raise InvalidArgument(
            f"input {name!r} has {len(shape)} dimensions, over the limit of "
            f"{limits.max_input_rank} (--max-input-rank)"
        )
    parameters = dict(json_object(item.get("parameters", {}), f"input {name!r}'s"))
    size = parameters.pop("binary_data_size", None)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    set_parameters(tensor.parameters, parameters, f"input {name!r}'s")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"input {name!r}: 'binary_data_size' must be a byte count")
        if offset + size > len(binary):
            raise InvalidArgument(
                f"input {name!r}: 'binary_data_size' {size} runs past the body's end "
                f"({len(binary) - offset} bytes left after the JSON header)"
            )
        request.raw_input_contents.append(bytes(binary[offset : offset + size]))
        return offset + size
    if _SHM_KEY in parameters:  # its bytes are in a shared memory region (shared_memory.py)
        return offset
    if "data" not in item:
        raise InvalidArgument(f"input {name!r} has no 'data' and no 'binary_data_size'")
    request.raw_input_contents.append(_json_tensor_bytes(name, datatype, shape, item["data"]))
    return offset


def _json_tensor_bytes(name: str, datatype: str, shape: list[int], data: Any) -> bytes:
    """``data`` (flat or nested, row-major) as the datatype's little-endian bytes."""
    numel = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_tensor(name, shape, numel, data)
    target = _JSON_NUMPY.get(datatype, np.float32 if datatype == "BF16" else None)
    if target is None:
        raise InvalidArgument(
            f"input {name!r} has datatype {datatype!r}; KServe v2 names: "
            f"{sorted(SAFETENSORS_OF)} and BYTES"
        )
    try:
        array = np.array(data)
    except (ValueError, OverflowError):  # ragged lists, or an integer past 64 bits
        array = None
    allowed = _KIND_OK[np.dtype(target).kind]
    if array is None or (array.size and array.dtype.kind not in allowed):
        raise InvalidArgument(
            f"input {name!r}: 'data' must be a list of {datatype} values, nested evenly or flat"
        )
    if array.size != numel:
        raise InvalidArgument(
            f"input {name!r}: shape {shape} needs {numel} values in 'data', got {array.size}"
        )
    if array.dtype.kind in "iu" and np.dtype(target).kind in "iu" and array.size:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidArgument(f"input {name!r}: values out of range for {datatype}")
    values = array.astype(target).reshape(-1)
    if datatype == "BF16":  # round to nearest even, then keep the top 16 bits
        wide = values.view(np.uint32).astype(np.uint64)
        return ((wide + 0x7FFF + ((wide >> 16) & 1)) >> 16).astype("<u2").tobytes()
    return values.astype(values.dtype.newbyteorder("<")).tobytes()


def _bytes_tensor(name: str, shape: list[int], numel: int, data: Any) -> bytes:
    """BYTES as Triton serializes it: each element a 4-byte little-endian length, then it."""
    items = _flatten(data, name, len(shape))
    if len(items) != numel:
        raise InvalidArgument(
            f"input {name!r}: shape {shape} needs {numel} values in 'data', got {len(items)}"
        )
    parts = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidArgument(f"input {name!r}: BYTES 'data' must hold strings")
        raw = item.encode("utf-8")
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def _flatten(data: Any, name: str, depth: int) -> list:
    if not isinstance(data, list):
        raise InvalidArgument(f"input {name!r}: 'data' must be a list")
    out: list = []
    stack = [(data, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, list):
            if level > depth:
                raise InvalidArgument(f"input {name!r}: 'data' is nested deeper than its shape")
            stack.extend((x, level + 1) for x in reversed(item))
        else:
            out.append(item)
    return out


def infer_response(
    response: pb.ModelInferResponse, binary_output: bool, binary_of: dict[str, bool]
) -> tuple[bytes, int | None]:
    """The body and, when any output travels in binary, the JSON header's length."""
    doc: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = parameters_json(response.parameters)
    raw = list(response.raw_output_contents)
    aligned = len(raw) == len(response.outputs)
    outputs, tail = [], []
    for out in response.outputs:
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": out.datatype,
            "shape": list(out.shape),
        }
        parameters = parameters_json(out.parameters)
        if not aligned and _SHM_KEY in parameters:  # written to its region, no bytes here
            entry["parameters"] = parameters
            outputs.append(entry)
            continue
        if not raw:
            raise InvalidArgument(f"output {out.name!r} came without its data")
        data = raw.pop(0)
        if binary_of.get(out.name, binary_output):
            parameters["binary_data_size"] = len(data)
            tail.append(data)
        else:
            entry["data"] = _json_values(out.name, out.datatype, list(out.shape), data)
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":"), allow_nan=True).encode()
    if not tail:
        return header, None
    return b"".join([header, *tail]), len(header)


def _json_values(name: str, datatype: str, shape: list[int], data: bytes) -> list:
    """One output's raw bytes as a flat JSON list."""
    if datatype == "BYTES":
        values, offset = [], 0
        while offset + 4 <= len(data):
            (length,) = struct.unpack_from("<I", data, offset)
            item = bytes(data[offset + 4 : offset + 4 + length])
            try:
                values.append(item.decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidArgument(
                    f"output {name!r} holds bytes that are not UTF-8 text: ask for it "
                    "with the 'binary_data' parameter"
                ) from None
            offset += 4 + length
        return values
    dtype_name = SAFETENSORS_OF.get(datatype)
    if dtype_name is None:
        raise InvalidArgument(f"output {name!r} has datatype {datatype!r}, not one JSON carries")
    carried = np.frombuffer(data, dtype=CARRIER[dtype_name])
    return to_numpy(dtype_name, carried).tolist()


def body_too_large(size: int | None, limit: int) -> str:
    """The one line a body over ``--http-max-body-mb`` is answered with (413)."""
    told = f"{size} bytes, " if size is not None else ""
    return (
        f"the request body is {told}over the limit of {limit} bytes (--http-max-body-mb); "
        "split the request, or send large tensors over gRPC or shared memory"
    )


def message_json(message) -> dict:
    """A response message as Triton's REST API writes it: field names as in the proto,
    every field present (zeros too), 64-bit integers as numbers, enums by name; a oneof only
    as the member that is set. Written here rather than ``json_format`` (whose options were
    renamed between protobuf 4 and 5, both of which paramserve runs on)."""
    out: dict[str, Any] = {}
    descriptor = message.DESCRIPTOR
    chosen = {o.name: message.WhichOneof(o.name) for o in descriptor.oneofs}
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and chosen[oneof.name] != field.name:
            continue
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            kind = value_field.message_type
            if kind is not None and "parameter_choice" in kind.oneofs_by_name:
                out[field.name] = parameters_json(value)  # KServe's plain values
            else:
                out[field.name] = {k: _field_value(value_field, v) for k, v in value.items()}
        elif field.label == field.LABEL_REPEATED:
            out[field.name] = [_field_value(field, v) for v in value]
        elif field.message_type is not None and not message.HasField(field.name):
            continue  # an unset message (a config's dynamic_batching): left out, as Triton does
        else:
            out[field.name] = _field_value(field, value)
    return out


def _field_value(field, value) -> Any:
    if field.message_type is not None:
        return message_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if field.type == field.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    return value
