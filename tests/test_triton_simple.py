"""Triton's ``simple`` model (built in: INT32 INPUT0, INPUT1 [-1, 16] → OUTPUT0 sum, OUTPUT1
difference) through the calls of Triton's own example clients, made with tritonclient.grpc
unchanged: simple_grpc_infer_client, simple_grpc_async_infer_client,
simple_grpc_health_metadata and simple_grpc_model_control (the last two against what paramserve
is, not Triton: its server name, its model count, its messages). The string clients are not run:
paramserve serves no BYTES inputs."""

from __future__ import annotations

import queue
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from paramserve.service.client import Client

from conftest import ServerProcess

MODEL = "simple"


def simple_inputs(rows: int = 1):
    """What the examples send: INPUT0 = 0..15, INPUT1 = ones, as [1, 16] INT32."""
    input0 = np.tile(np.arange(16, dtype=np.int32), (rows, 1))
    input1 = np.ones((rows, 16), dtype=np.int32)
    inputs = [grpcclient.InferInput("INPUT0", [rows, 16], "INT32"),
              grpcclient.InferInput("INPUT1", [rows, 16], "INT32")]
    inputs[0].set_data_from_numpy(input0)
    inputs[1].set_data_from_numpy(input1)
    return inputs, input0, input1


def check_sum_and_difference(result, input0, input1) -> None:
    assert np.array_equal(result.as_numpy("OUTPUT0"), input0 + input1)
    assert np.array_equal(result.as_numpy("OUTPUT1"), input0 - input1)


@pytest.fixture(scope="module")
def simple_server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("simple") / "data")
    with Client(srv.address) as client:
        client.create_model(MODEL, "simple")  # no parameters: version 1 at once, no upload
    yield srv
    srv.stop()


@pytest.fixture
def triton(simple_server):
    client = grpcclient.InferenceServerClient(url=simple_server.address)
    yield client
    client.close()


def test_simple_grpc_infer_client(triton):
    inputs, input0, input1 = simple_inputs()
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"),
               grpcclient.InferRequestedOutput("OUTPUT1")]
    result = triton.infer(model_name=MODEL, inputs=inputs, outputs=outputs,
                          client_timeout=30, headers={"test": "1"})
    statistics = triton.get_inference_statistics(model_name=MODEL)
    assert len(statistics.model_stats) == 1
    check_sum_and_difference(result, input0, input1)
    result = triton.infer(model_name=MODEL, inputs=inputs, outputs=None)  # every output
    check_sum_and_difference(result, input0, input1)
    # One output requested: only that one comes back.
    result = triton.infer(model_name=MODEL, inputs=inputs,
                          outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    assert result.as_numpy("OUTPUT0") is None
    assert np.array_equal(result.as_numpy("OUTPUT1"), input0 - input1)


def test_simple_grpc_async_infer_client(triton):
    inputs, input0, input1 = simple_inputs()
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"),
               grpcclient.InferRequestedOutput("OUTPUT1")]
    done: queue.Queue = queue.Queue()

    def callback(user_data, result, error):
        user_data.put(error if error else result)

    triton.async_infer(model_name=MODEL, inputs=inputs, callback=partial(callback, done),
                       outputs=outputs, client_timeout=30)
    result = done.get(timeout=30)
    assert not isinstance(result, InferenceServerException), result
    check_sum_and_difference(result, input0, input1)
    # Many in flight at once, of different batch sizes: each gets its own rows back.
    for rows in range(1, 17):
        inputs, _, _ = simple_inputs(rows)
        inputs[1].set_data_from_numpy(np.full((rows, 16), rows, np.int32))
        triton.async_infer(model_name=MODEL, inputs=inputs,
                           callback=partial(callback, done), client_timeout=30)
    seen = set()
    for _ in range(16):
        result = done.get(timeout=30)
        assert not isinstance(result, InferenceServerException), result
        rows = result.as_numpy("OUTPUT0").shape[0]
        input0 = np.tile(np.arange(16, dtype=np.int32), (rows, 1))
        check_sum_and_difference(result, input0, np.full((rows, 16), rows, np.int32))
        seen.add(rows)
    assert seen == set(range(1, 17))


def test_simple_grpc_health_metadata(triton):
    assert triton.is_server_live(headers={"test": "1", "dummy": "2"})
    assert triton.is_server_ready()
    assert triton.is_model_ready(MODEL)
    assert triton.get_server_metadata().name == "paramserve"  # Triton says "triton"
    metadata = triton.get_model_metadata(MODEL, headers={"test": "1", "dummy": "2"})
    assert metadata.name == MODEL and list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("INPUT0", "INT32", [-1, 16]), ("INPUT1", "INT32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("OUTPUT0", "INT32", [-1, 16]), ("OUTPUT1", "INT32", [-1, 16])]
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("wrong_model_name")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    config = triton.get_model_config(MODEL).config
    assert config.name == MODEL and config.max_batch_size > 1
    assert [(t.name, list(t.dims)) for t in config.input] == [("INPUT0", [16]), ("INPUT1", [16])]


def test_simple_grpc_model_control(tmp_path):
    """The model-control example's calls under Triton's explicit mode."""
    srv = ServerProcess(tmp_path / "data", "--model-control-mode", "explicit")
    try:
        with Client(srv.address) as client:
            client.create_model(MODEL, "simple")
        triton = grpcclient.InferenceServerClient(url=srv.address)
        assert len(triton.get_model_repository_index().models) == 1
        assert not triton.is_model_ready(MODEL)
        triton.load_model(MODEL)
        assert triton.is_model_ready(MODEL)
        with pytest.raises(InferenceServerException) as info:  # the example's bad format
            triton.load_model(MODEL, config='"parameters": {"config": {{"max_batch_size": "16"}}}')
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        triton.load_model(MODEL, config='{"max_batch_size":"16"}')
        assert triton.get_model_config(MODEL).config.max_batch_size == 16
        inputs, input0, input1 = simple_inputs(3)
        check_sum_and_difference(triton.infer(MODEL, inputs), input0, input1)
        triton.unload_model(MODEL)
        assert not triton.is_model_ready(MODEL)
        assert triton.is_server_live()
        with pytest.raises(InferenceServerException) as info:
            triton.load_model("wrong_model_name")
        assert info.value.status() == "StatusCode.NOT_FOUND"
        triton.close()
    finally:
        srv.stop()
