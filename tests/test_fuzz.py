"""Property-based tests: random tensors, inference requests and upload streams never crash the
codec or the server, never answer INTERNAL/UNKNOWN, and leave the server up."""

from __future__ import annotations

import hashlib

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paramserve.protos import inference_pb2 as pb
from paramserve.protos import inference_pb2_grpc
from paramserve.protos import registry_pb2 as rpb
from paramserve.protos import registry_pb2_grpc
from paramserve.registry import InvalidArgument, ResourceExhausted
from paramserve.registry.signature import TensorSignature
from paramserve.service import codec
from safetensors.torch import save as st_save

from conftest import reference_module

DATATYPES = sorted(codec.TORCH_OF) + ["BYTES", "FP8", "", "fp32"]
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.FAILED_PRECONDITION}
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

shapes = st.lists(st.one_of(st.integers(min_value=-2, max_value=6),
                            st.integers(min_value=2**31, max_value=2**63 - 1)),
                  min_size=0, max_size=4)
parameters = st.dictionaries(st.text(max_size=8), st.one_of(
    st.booleans(), st.integers(-2**63, 2**63 - 1), st.text(max_size=8), st.floats()), max_size=3)


def infer_request(model: str, datatype: str, shape: list[int], raw: bytes | None,
                  typed: list[float] | None, params: dict, name: str = "input"):
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    for key, value in params.items():
        param = request.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, str):
            param.string_param = value
        else:
            param.double_param = value
    if raw is not None:
        request.raw_input_contents.append(raw)
    if typed is not None:
        tensor.contents.fp32_contents.extend(typed)
    return request


@FUZZ
@given(datatype=st.sampled_from(DATATYPES), shape=shapes, raw=st.binary(max_size=64),
       use_raw=st.booleans(), typed=st.lists(st.floats(width=32), max_size=12))
def test_codec_refuses_or_decodes_but_never_crashes(datatype, shape, raw, use_raw, typed):
    request = infer_request("m", datatype, shape, raw if use_raw else None,
                            None if use_raw else typed, {})
    spec = TensorSignature("input", torch.float32, (-1, 4))
    try:
        tensor = codec.decode_inputs(request, _Signature(spec), max_elements=1000)["input"]
    except (InvalidArgument, ResourceExhausted):
        return
    assert tensor.dtype == torch.float32 and tensor.shape[-1] == 4 and tensor.dim() == 2


class _Signature:
    def __init__(self, spec):
        self.inputs = (spec,)


@pytest.fixture(scope="module")
def fuzz_model(server):
    from paramserve.service.client import Client

    with Client(server.address) as client:
        client.create_model("fuzz", "small_mlp")
        client.upload("fuzz", reference_module("small_mlp", False).state_dict())
        client.create_model("fuzz-lazy", "small_mlp", {"in_features": None})
    return server


@FUZZ
@given(model=st.sampled_from(["fuzz", "fuzz-lazy", "nope", ""]),
       datatype=st.sampled_from(DATATYPES), shape=shapes, raw=st.binary(max_size=96),
       use_raw=st.booleans(), typed=st.lists(st.floats(width=32), max_size=12),
       params=parameters, name=st.sampled_from(["input", "x", ""]),
       version=st.sampled_from(["", "1", "7", "production", "-1", "latest"]))
def test_random_model_infer_requests_get_a_clean_status(fuzz_model, model, datatype, shape, raw,
                                                         use_raw, typed, params, name, version):
    with grpc.insecure_channel(fuzz_model.address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = infer_request(model, datatype, shape, raw if use_raw else None,
                                None if use_raw else typed, params, name)
        request.model_version = version
        try:
            stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as err:
            assert err.code() in ACCEPTABLE, (err.code(), err.details())
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


@FUZZ
@given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
       shuffle=st.randoms(use_true_random=False), drop_tail=st.integers(0, 3),
       header_first=st.booleans())
def test_random_upload_streams_are_accepted_whole_or_refused_cleanly(fuzz_model, cuts, shuffle,
                                                                     drop_tail, header_first):
    data = st_save(reference_module("small_mlp", False, seed=3).state_dict())
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(points, points[1:]) if b > a]
    reordered = list(chunks)
    if len(reordered) > 1 and shuffle.random() < 0.5:
        shuffle.shuffle(reordered)
    sent = reordered[:len(reordered) - drop_tail] if drop_tail else reordered
    header = rpb.UploadChunk(header=rpb.UploadHeader(
        model="fuzz", sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)))
    body = [rpb.UploadChunk(data=c) for c in sent]
    stream = [header] + body if header_first else body + [header]
    intact = header_first and b"".join(sent) == data
    with grpc.insecure_channel(fuzz_model.address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        try:
            stub.UploadVersion(iter(stream), timeout=60)
            assert intact, "a damaged stream was accepted"
        except grpc.RpcError as err:
            assert not intact, err.details()
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        live = inference_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(
            pb.ServerLiveRequest(), timeout=10)
        assert live.live
