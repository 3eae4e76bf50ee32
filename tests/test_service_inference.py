"""KServe v2 inference against a real server: every built-in through the project's client and
through tritonclient, compared with the same module run in-process."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from paramserve.protos import inference_pb2 as pb
from paramserve.protos import inference_pb2_grpc
from paramserve.registry import FailedPrecondition, InvalidArgument, NotFound

from conftest import (ALL_BUILTINS, LAZY_BUILTINS, config_for, example_input, reference_module)

VARIANTS = [(name, False) for name in ALL_BUILTINS] + [(name, True) for name in LAZY_BUILTINS]
TOLERANCE = 1e-6


def run_probe(tmp_path: Path, address: str, calls: list[dict]) -> dict:
    """tritonclient in this process, beside paramserve's own messages."""
    import triton_probe

    return triton_probe.probe(address, calls)


def as_float64(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64)
    return torch.from_numpy(np.array(value, dtype=np.float64))


def max_diff(a, b) -> float:
    return (as_float64(a) - as_float64(b)).abs().max().item()


def test_every_builtin_through_both_clients_matches_in_process(server, client, tmp_path):
    calls, expected = [], {}
    for i, (arch, lazy) in enumerate(VARIANTS):
        name = f"all-{arch}{'-lazy' if lazy else ''}"
        module = reference_module(arch, lazy, seed=i)
        client.create_model(name, arch, config_for(arch, lazy))
        if module.state_dict():  # one without parameters has its version 1 from create
            client.upload(name, module.state_dict())
        x = example_input(arch, lazy, seed=100 + i)
        with torch.no_grad():
            expected[name] = module(x)
        ours = client.infer(name, x)
        assert ours.shape == expected[name].shape, name
        assert max_diff(ours, expected[name]) <= TOLERANCE, name
        np.save(tmp_path / f"{name}.in.npy", x.numpy())
        calls.append({"model": name, "input": str(tmp_path / f"{name}.in.npy"),
                      "output": str(tmp_path / f"{name}.out.npy")})
    report = run_probe(tmp_path, server.address, calls)
    assert report["live"] and report["ready"]
    # Exactly the extensions that work, each exercised by its own tests (repository, config
    # and statistics here; shared memory, classification, binary data and parameters in
    # test_shared_memory, test_multi_io and test_http): nothing listed that is not served.
    assert sorted(report["server"]["extensions"]) == sorted([
        "model_repository", "model_configuration", "statistics", "parameters",
        "system_shared_memory", "classification", "binary_tensor_data"])
    for call in report["calls"]:
        assert "error" not in call, call
        out = np.load(next(c["output"] for c in calls if c["model"] == call["model"]))
        assert max_diff(out, expected[call["model"]]) <= TOLERANCE, call["model"]
        meta, config = call["metadata"], call["config"]["config"]
        assert [i["name"] for i in meta["inputs"]] == [i["name"] for i in config["input"]]
        assert [o["name"] for o in meta["outputs"]] == [o["name"] for o in config["output"]]
        stats = call["statistics"]["model_stats"][0]
        assert stats["version"] == "1" and int(stats["inference_count"]) >= 1


def test_metadata_and_config_describe_batch_and_free_dims(client, server, model_name,
                                                          tmp_path):
    client.create_model(model_name, "sequential_mlp")
    client.upload(model_name, reference_module("sequential_mlp", False).state_dict())
    meta = client.model_metadata(model_name)
    assert list(meta.inputs[0].shape) == [-1, 20] and meta.inputs[0].datatype == "FP32"
    assert list(meta.outputs[0].shape) == [-1, 10]
    assert meta.parameters["device"].string_param == "cpu"
    lazy = model_name + "-lazy"
    client.create_model(lazy, "mlp", {"in_features": None})
    assert list(client.model_metadata(lazy).inputs[0].shape) == [-1, -1]
    scalar = model_name + "-scalar"
    client.create_model(scalar, "fixed_hidden_mlp")
    client.upload(scalar, reference_module("fixed_hidden_mlp", False).state_dict())
    x = torch.rand(3, 20)
    np.save(tmp_path / "x.npy", x.numpy())
    report = run_probe(tmp_path, server.address, [
        {"model": model_name, "input": str(tmp_path / "x.npy"), "output": str(tmp_path / "a.npy")},
        {"model": scalar, "input": str(tmp_path / "x.npy"), "output": str(tmp_path / "b.npy")}])
    batched, unbatched = (c["config"]["config"] for c in report["calls"])
    assert batched["max_batch_size"] == 64 and batched["input"][0]["dims"] == ["20"]
    assert unbatched.get("max_batch_size", 0) == 0
    assert report["calls"][1]["metadata"]["outputs"][0].get("shape", []) == []  # a scalar
    expected = reference_module("fixed_hidden_mlp", False)(x)
    assert np.load(tmp_path / "b.npy").shape == () and max_diff(np.load(tmp_path / "b.npy"),
                                                                expected) <= TOLERANCE


def test_alias_moves_change_what_production_serves(client, model_name):
    client.create_model(model_name, "small_mlp")
    first = reference_module("small_mlp", False, seed=1)
    second = reference_module("small_mlp", False, seed=2)
    client.upload(model_name, first.state_dict(), alias="production")
    client.upload(model_name, second.state_dict())
    x = torch.rand(4, 4)
    assert max_diff(client.infer(model_name, x, "production"), first(x)) <= TOLERANCE
    assert max_diff(client.infer(model_name, x), second(x)) <= TOLERANCE  # latest
    client.set_alias(model_name, "production", 2)
    assert max_diff(client.infer(model_name, x, "production"), second(x)) <= TOLERANCE
    assert max_diff(client.infer(model_name, x, "1"), first(x)) <= TOLERANCE


def test_lazy_model_is_ready_and_its_first_request_creates_one_version(client, server,
                                                                       model_name):
    client.create_model(model_name, "nest_mlp", {"in_features": None}, seed=3)
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(client.channel)
    assert stub.ModelReady(pb.ModelReadyRequest(name=model_name)).ready
    x = torch.rand(2, 12)
    request = pb.ModelInferRequest(model_name=model_name)
    request.inputs.add(name="input", datatype="FP32", shape=[2, 12])
    request.raw_input_contents.append(x.numpy().tobytes())
    futures = [stub.ModelInfer.future(request, timeout=120) for _ in range(32)]
    # Batched rows may take another BLAS path: the same up to float rounding, not bit for bit.
    outputs = [np.frombuffer(f.result().raw_output_contents[0], dtype=np.float32)
               for f in futures]
    assert all(max_diff(o, outputs[0]) <= TOLERANCE for o in outputs)
    versions = client.list_versions(model_name)
    assert [(v.number, v.origin) for v in versions] == [(1, "lazy-init")]
    state = client.state_dict(model_name)
    assert state["net.0.weight"].shape == (64, 12)
    module = reference_module("nest_mlp", False)
    module.net[0] = torch.nn.Linear(12, 64)
    module.load_state_dict(state)
    assert max_diff(outputs[0], module(x).reshape(-1)) <= TOLERANCE


def test_a_bad_first_request_to_a_lazy_model_creates_nothing(client, model_name):
    client.create_model(model_name, "fixed_hidden_mlp", {"in_features": None})
    with pytest.raises(InvalidArgument, match="does not fit"):
        client.infer(model_name, torch.rand(2, 30))  # the shared layer fixes the width at 20
    with pytest.raises(InvalidArgument, match="FP32"):
        client.infer(model_name, torch.rand(2, 20, dtype=torch.float64))
    assert client.list_versions(model_name) == []


def test_typed_contents_and_requested_outputs(client, model_name):
    client.create_model(model_name, "small_mlp")
    module = reference_module("small_mlp", False)
    client.upload(model_name, module.state_dict())
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(client.channel)
    x = torch.rand(2, 4)
    request = pb.ModelInferRequest(model_name=model_name, id="req-7")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    request.outputs.add(name="output")
    response = stub.ModelInfer(request)
    assert response.id == "req-7" and response.model_version == "1"
    y = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, 1)
    assert max_diff(y, module(x)) <= TOLERANCE
    request.outputs[0].name = "logits"
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no output(s) ['logits']" in info.value.details()


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12), "needs 32 raw bytes, got 12"),
    (lambda r: setattr(r.inputs[0], "name", "x"), "has no input 'x'"),
    (lambda r: setattr(r.inputs[0], "datatype", "FP64"), "is FP64, the model takes FP32"),
    (lambda r: setattr(r.inputs[0], "datatype", "BYTES"), "has datatype 'BYTES'"),
    (lambda r: r.inputs[0].shape.__setitem__(1, 5), "has shape [2, 5]"),
    (lambda r: r.raw_input_contents.append(b""), "2 buffers for 1 inputs"),
])
def test_bad_inference_requests_name_the_tensor(client, model_name, mutate, message):
    client.create_model(model_name, "small_mlp")
    client.upload(model_name, reference_module("small_mlp", False).state_dict())
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(client.channel)
    request = pb.ModelInferRequest(model_name=model_name)
    request.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.append(torch.rand(2, 4).numpy().tobytes())
    mutate(request)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_inference_status_codes(client, model_name):
    with pytest.raises(NotFound, match="not found"):
        client.infer("no-such-model", torch.rand(1, 4))
    client.create_model(model_name, "mlp")
    with pytest.raises(FailedPrecondition, match="no version to serve"):
        client.infer(model_name, torch.rand(1, 20))
    client.upload(model_name, reference_module("mlp", False).state_dict())
    with pytest.raises(NotFound, match="no alias 'staging'"):
        client.infer(model_name, torch.rand(1, 20), "staging")
    with pytest.raises(NotFound, match="no version 9"):
        client.infer(model_name, torch.rand(1, 20), "9")


def test_too_many_elements_is_resource_exhausted(client, model_name):
    from paramserve.registry import ResourceExhausted

    client.create_model(model_name, "centered_layer")
    client.upload(model_name, {})
    with pytest.raises(ResourceExhausted, match="over the limit"):
        client.infer(model_name, torch.zeros(4_000_001))
    assert client.infer(model_name, torch.tensor([1.0, 2, 3, 4, 5])).tolist() == [-2, -1, 0, 1, 2]


def test_statistics_count_inferences_per_version(client, model_name):
    client.create_model(model_name, "small_mlp")
    client.upload(model_name, reference_module("small_mlp", False).state_dict())
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(client.channel)

    def count() -> int:
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model_name)).model_stats
        return sum(s.inference_count for s in stats if s.version == "1")

    before = count()
    for _ in range(3):
        client.infer(model_name, torch.rand(5, 4))
    assert count() == before + 15


def test_repository_extension(client, model_name):
    client.create_model(model_name, "small_mlp")
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(client.channel)
    index = {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert index[model_name].state == "UNAVAILABLE"
    with pytest.raises(grpc.RpcError) as info:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model_name))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    client.upload(model_name, reference_module("small_mlp", False).state_dict())
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model_name))
    index = {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert (index[model_name].state, index[model_name].version) == ("READY", "1")
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=model_name))
    assert client.infer(model_name, torch.rand(1, 4)).shape == (1, 1)  # loads again


def test_concurrent_requests_from_threads_all_succeed(client, model_name):
    client.create_model(model_name, "rgnet")
    module = reference_module("rgnet", False)
    client.upload(model_name, module.state_dict())
    errors = []

    def worker(seed):
        x = torch.rand(3, 4, generator=torch.Generator().manual_seed(seed))
        for _ in range(10):
            if max_diff(client.infer(model_name, x), module(x)) > TOLERANCE:
                errors.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
