"""The tensor codec: every KServe datatype torch has, raw and typed, and its checks."""

from __future__ import annotations

import pytest
import torch

from paramserve.protos import inference_pb2 as pb
from paramserve.registry import InvalidArgument, ResourceExhausted
from paramserve.registry.signature import TensorSignature
from paramserve.service import codec

RAW_TYPES = sorted(codec.TORCH_OF)


def sample(dtype: torch.dtype) -> torch.Tensor:
    return (torch.arange(6).reshape(2, 3) % 3).to(dtype)


def as_request(tensor: torch.Tensor, datatype: str, raw: bool = True):
    request = pb.ModelInferRequest(model_name="m")
    entry = request.inputs.add(name="input", datatype=datatype, shape=list(tensor.shape))
    if raw:
        request.raw_input_contents.append(codec_bytes(tensor))
    else:
        field, _ = codec.TYPED_FIELD[datatype]
        getattr(entry.contents, field).extend(tensor.reshape(-1).tolist())
    return request


def codec_bytes(tensor):
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("datatype", RAW_TYPES)
def test_raw_round_trip_of_every_datatype(datatype):
    dtype = codec.TORCH_OF[datatype]
    tensor = sample(dtype)
    spec = TensorSignature("input", dtype, (-1, 3))
    decoded = codec.decode_tensor(as_request(tensor, datatype).inputs[0],
                                  codec_bytes(tensor), spec, 100)
    assert decoded.dtype == dtype and torch.equal(decoded.view(torch.uint8),
                                                  tensor.view(torch.uint8))
    response = pb.ModelInferResponse()
    codec.encode_output(response, "output", tensor)
    assert response.outputs[0].datatype == datatype
    assert list(response.outputs[0].shape) == [2, 3]
    assert response.raw_output_contents[0] == codec_bytes(tensor)


@pytest.mark.parametrize("datatype", sorted(codec.TYPED_FIELD))
def test_typed_contents_of_every_datatype_that_has_a_field(datatype):
    dtype = codec.TORCH_OF[datatype]
    tensor = sample(dtype)
    request = as_request(tensor, datatype, raw=False)
    decoded = codec.decode_tensor(request.inputs[0], None,
                                  TensorSignature("input", dtype, (2, 3)), 100)
    assert decoded.dtype == dtype and torch.equal(decoded, tensor)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_precision_must_travel_raw(datatype):
    request = pb.ModelInferRequest()
    request.inputs.add(name="input", datatype=datatype, shape=[1])
    with pytest.raises(InvalidArgument, match="raw_input_contents"):
        codec.decode_tensor(request.inputs[0], None,
                            TensorSignature("input", codec.TORCH_OF[datatype], (1,)), 10)


def test_out_of_range_typed_values_are_refused():
    request = pb.ModelInferRequest()
    entry = request.inputs.add(name="input", datatype="INT8", shape=[2])
    entry.contents.int_contents.extend([1, 300])
    with pytest.raises(InvalidArgument, match="out of range for INT8"):
        codec.decode_tensor(entry, None, TensorSignature("input", torch.int8, (2,)), 10)


def test_shape_and_size_checks():
    spec = TensorSignature("input", torch.float32, (-1, 4))
    request = as_request(torch.zeros(2, 4), "FP32")
    with pytest.raises(ResourceExhausted, match="over the limit of 7"):
        codec.decode_tensor(request.inputs[0], request.raw_input_contents[0], spec, 7)
    request.inputs[0].shape[:] = [2, -4]
    with pytest.raises(InvalidArgument, match="negative dimension"):
        codec.decode_tensor(request.inputs[0], b"", spec, 100)
    request.inputs[0].shape[:] = [8]
    with pytest.raises(InvalidArgument, match=r"shape \[8\], the model takes \[-1, 4\]"):
        codec.decode_tensor(request.inputs[0], b"", spec, 100)


def test_an_empty_batch_decodes():
    spec = TensorSignature("input", torch.float32, (-1, 4))
    request = as_request(torch.zeros(0, 4), "FP32")
    assert codec.decode_tensor(request.inputs[0], b"", spec, 100).shape == (0, 4)
