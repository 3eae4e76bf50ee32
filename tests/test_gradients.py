"""Registry.Gradients against a real server: every built-in's gradients equal the same module's
in-process backward(), for each loss and for grad_outputs; restriction, stats, streaming, the
served module untouched, bounds and errors, a read-only token, and ``paramserve grad``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ALL_BUILTINS,
    LAZY_BUILTINS,
    ServerProcess,
    config_for,
    example_input,
    reference_module,
)

from paramserve.protos import registry_pb2 as pb
from paramserve.protos import registry_pb2_grpc
from paramserve.registry import InvalidArgument, NotFound, ResourceExhausted, get_architecture
from paramserve.service.client import Client

VARIANTS = [(name, False) for name in ALL_BUILTINS] + [(name, True) for name in LAZY_BUILTINS]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One torch thread in the server and in the in-process reference: a matmul's reduction
    is then split alike, so the gradients can be compared bit for bit."""
    srv = ServerProcess(tmp_path_factory.mktemp("server") / "data", "--max-upload-mb", "64",
                        "--max-tensor-elements", "4000000", "--torch-threads", "1")
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_process(module, x, loss, target=None, seed=None) -> tuple[float | None, dict]:
    """What a user computes: the seeds' backward() on the module itself (a None grad: zeros)."""
    net = copy.deepcopy(module).eval()
    y = net(x)
    if loss == "sum":
        total = y.sum()
    elif loss == "mse":
        total = F.mse_loss(y, target)
    elif loss == "cross_entropy":
        total = F.cross_entropy(y, target)
    else:
        total = None
    if total is not None and total.requires_grad:
        total.backward()
    elif total is None and y.requires_grad:
        y.backward(seed)
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
             for n, p in net.named_parameters(remove_duplicate=False)}
    return (None if total is None else float(total)), grads


def targets_for(y: torch.Tensor, seed: int) -> dict:
    """A target per loss the output admits (cross_entropy needs a class dim)."""
    gen = torch.Generator().manual_seed(seed)
    out = {"sum": None, "mse": torch.randn(y.shape, generator=gen)}
    if y.dim() >= 1:
        classes = y.shape[1] if y.dim() > 1 else y.shape[0]
        shape = (y.shape[0], *y.shape[2:]) if y.dim() > 1 else ()
        out["cross_entropy"] = torch.randint(0, classes, shape, generator=gen)
    out["grad_outputs"] = torch.randn(y.shape, generator=gen)
    return out


def assert_same(got: dict, expected: dict, what: str) -> None:
    assert set(got) == set(expected), what
    for name, grad in expected.items():
        value = torch.as_tensor(got[name])
        assert value.shape == grad.shape, (what, name)
        # same float ops on the same CPU: equal, up to the thread split of a matmul
        assert torch.allclose(value, grad, rtol=1e-5, atol=1e-6), (what, name,
                                                                   (value - grad).abs().max())


def test_every_builtin_matches_in_process_backward_for_each_loss(client):
    inexact = []
    checked = 0
    for i, (arch, lazy) in enumerate(VARIANTS):
        name = f"g-{arch}{'-lazy' if lazy else ''}"
        module = reference_module(arch, lazy, seed=i)
        client.create_model(name, arch, config_for(arch, lazy))
        if module.state_dict():
            client.upload(name, module.state_dict())
        x = example_input(arch, lazy, seed=200 + i)
        with torch.no_grad():
            y = module(x)
        for loss, target in targets_for(y, seed=300 + i).items():
            what = f"{arch} lazy={lazy} {loss}"
            if loss == "grad_outputs":
                expected_loss, expected = in_process(module, x, None, seed=target)
                got = client.gradients(name, x, grad_outputs=target)
            else:
                expected_loss, expected = in_process(module, x, loss, target)
                got = client.gradients(name, x, loss=loss, targets=target)
            assert_same(got.grads, expected, what)
            assert (got.loss is None) == (expected_loss is None), what
            if expected_loss is not None:
                assert got.loss == pytest.approx(expected_loss, rel=1e-6, abs=1e-7), what
            checked += 1
            if not all(torch.equal(got.grads[n], g) for n, g in expected.items()):
                inexact.append(what)
            assert all(isinstance(g, torch.Tensor) for g in got.grads.values())  # torch in
        as_numpy = client.gradients(name, x.numpy())
        assert all(isinstance(g, np.ndarray) for g in as_numpy.grads.values()), arch
        if not module.state_dict():  # centered_layer: no parameters, says so by none
            assert as_numpy.grads == {} and as_numpy.stats == {}
    assert checked >= 3 * len(VARIANTS)
    assert inexact == []  # bit for bit on CPU


def test_tied_parameters_get_one_gradient_under_every_name(client, model_name):
    client.create_model(model_name, "tied_mlp")
    module = reference_module("tied_mlp", False)
    client.upload(model_name, module.state_dict())
    x = example_input("tied_mlp", False, seed=1)
    got = client.gradients(model_name, x.numpy())
    np.testing.assert_array_equal(got.grads["2.weight"], got.grads["4.weight"])
    assert got.stats["2.weight"].tied_with == ("4.weight",)
    assert got.stats["4.bias"].tied_with == ("2.bias",)
    _, expected = in_process(module, x, "sum")  # a shared Parameter's grad: both uses summed
    np.testing.assert_array_equal(got.grads["4.weight"], expected["2.weight"].numpy())


def test_restricted_by_names_and_by_submodule_path(client, model_name):
    client.create_model(model_name, "tied_mlp")
    client.upload(model_name, reference_module("tied_mlp", False).state_dict())
    x = example_input("tied_mlp", False).numpy()
    every = client.gradients(model_name, x)
    one = client.gradients(model_name, x, params=["2.weight"])
    assert list(one.grads) == ["2.weight"] and one.stats["2.weight"].tied_with == ("4.weight",)
    np.testing.assert_array_equal(one.grads["2.weight"], every.grads["2.weight"])
    sub = client.gradients(model_name, x, params="6")  # net[6]'s parameters, full keys
    assert list(sub.grads) == ["6.weight", "6.bias"]
    both = client.gradients(model_name, x, params=["0.bias", "6"])
    assert list(both.grads) == ["0.bias", "6.weight", "6.bias"]  # state_dict order
    with pytest.raises(NotFound, match="nope"):
        client.gradients(model_name, x, params=["nope"])
    with pytest.raises(NotFound, match="model"):
        client.gradients(model_name, x, params=["9"])


def test_stats_only_sends_no_values(client, model_name):
    client.create_model(model_name, "mlp")
    module = reference_module("mlp", False)
    client.upload(model_name, module.state_dict())
    x = example_input("mlp", False)
    target = torch.zeros(module(x).shape)
    got = client.gradients(model_name, x, loss="mse", targets=target, stats_only=True)
    _, expected = in_process(module, x, "mse", target)
    assert got.grads == {} and set(got.stats) == set(expected)
    for name, grad in expected.items():
        stat, wide = got.stats[name], grad.double()
        assert stat.shape == tuple(grad.shape) and stat.dtype == "F32"
        assert stat.norm == pytest.approx(float(wide.norm()), rel=1e-6)
        assert stat.min == pytest.approx(float(wide.min()), rel=1e-6, abs=1e-9)
        assert stat.max == pytest.approx(float(wide.max()), rel=1e-6, abs=1e-9)
        assert stat.mean == pytest.approx(float(wide.mean()), rel=1e-6, abs=1e-9)


def test_a_large_gradient_streams_in_many_chunks(server, client, model_name):
    config = {"hidden": 40_000}  # a 40000x20 weight: 3.2 MB, over the 1 MiB chunks
    client.create_model(model_name, "sequential_mlp", config)
    module = get_architecture("sequential_mlp").build(config, seed=1).eval()
    client.upload(model_name, module.state_dict())
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    request = pb.GradientsRequest(model=model_name, loss="sum", inputs=[pb.Tensor(
        name="input", dtype="F32", shape=[3, 20], data=x.numpy().tobytes())])
    stub = registry_pb2_grpc.RegistryStub(client.channel)
    chunks = list(stub.Gradients(request, timeout=60))
    assert chunks[0].WhichOneof("kind") == "header"
    data = [c.data for c in chunks[1:]]
    assert len(data) >= 4 and max(map(len, data)) <= 1 << 20
    sizes = [g.size_bytes for g in chunks[0].header.gradients]
    assert sum(map(len, data)) == sum(sizes) and max(sizes) > 1 << 20
    _, expected = in_process(module, x, "sum")
    assert_same(client.gradients(model_name, x).grads, expected, "big")


def test_the_served_module_is_unchanged(client, model_name):
    client.create_model(model_name, "small_mlp")
    module = reference_module("small_mlp", False)
    client.upload(model_name, module.state_dict())
    x = example_input("small_mlp", False, seed=4)
    before_y, before_state = client.infer(model_name, x), client.state_dict(model_name)
    for _ in range(3):
        first = client.gradients(model_name, x, loss="mse", targets=torch.ones(2, 1))
    again = client.gradients(model_name, x, loss="mse", targets=torch.ones(2, 1))
    assert all(torch.equal(first.grads[k], again.grads[k]) for k in first.grads)  # deterministic
    assert first.loss == again.loss
    assert torch.equal(client.infer(model_name, x), before_y)
    after = client.state_dict(model_name)
    assert all(torch.equal(after[k], before_state[k]) for k in before_state)
    assert [v.number for v in client.list_versions(model_name)] == [1]  # nothing stored


def test_a_lazy_model_with_no_version_materializes_as_inference_does(client, model_name):
    client.create_model(model_name, "mlp", {"in_features": None}, seed=7)
    x = example_input("mlp", True, seed=2)
    got = client.gradients(model_name, x)
    assert got.version == 1 and got.grads
    module = get_architecture("mlp").build({"in_features": None}, seed=7)
    with torch.no_grad():
        module(x)  # materialized by the first input, as the server did
    module.load_state_dict(client.state_dict(model_name))
    _, expected = in_process(module, x, "sum")
    assert_same(got.grads, expected, "lazy")


def test_a_multi_input_model_without_parameters_answers_its_loss(client, model_name):
    client.create_model(model_name, "simple")
    a, b = np.arange(16, dtype=np.int32)[None], np.ones((1, 16), np.int32)
    got = client.gradients(model_name, {"INPUT0": a, "INPUT1": b})
    assert got.grads == {} and got.stats == {} and got.loss == float((a + b).sum() + (a - b).sum())
    with pytest.raises(InvalidArgument, match="INPUT1"):
        client.gradients(model_name, {"INPUT0": a})


def test_errors_name_what_is_wrong(client, model_name):
    client.create_model(model_name, "mlp")
    client.upload(model_name, reference_module("mlp", False).state_dict())
    x = example_input("mlp", False)
    with pytest.raises(InvalidArgument, match="unknown loss"):
        client.gradients(model_name, x, loss="hinge")
    with pytest.raises(InvalidArgument, match="needs a target"):
        client.gradients(model_name, x, loss="mse")
    with pytest.raises(InvalidArgument, match="shape"):
        client.gradients(model_name, x, loss="mse", targets=torch.zeros(3, 10))
    with pytest.raises(InvalidArgument, match="class indices"):
        client.gradients(model_name, x, loss="cross_entropy", targets=torch.tensor([0, 10]))
    with pytest.raises(InvalidArgument, match="grad_outputs"):
        client.gradients(model_name, x, grad_outputs=torch.zeros(2, 3))
    with pytest.raises(InvalidArgument, match="input"):
        client.gradients(model_name, torch.zeros(2, 7))
    stub = registry_pb2_grpc.RegistryStub(client.channel)
    huge = pb.GradientsRequest(model=model_name, loss="sum", inputs=[
        pb.Tensor(name="input", dtype="F32", shape=[1_000_000, 20])])  # checked before data
    with pytest.raises(Exception) as info:
        list(stub.Gradients(huge, timeout=30))
    assert info.value.code().name == "RESOURCE_EXHAUSTED"
    with pytest.raises(ResourceExhausted, match="target"):
        client._gradient_stream(pb.GradientsRequest(
            model=model_name, loss="mse", inputs=[pb.Tensor(name="input", dtype="F32",
            shape=[2, 20], data=x.numpy().tobytes())],
            target=pb.Tensor(name="target", dtype="F32", shape=[5_000_000])))
    with pytest.raises(ResourceExhausted, match="names"):
        client.gradients(model_name, x, params=["0.weight"] * 10_001)


def test_a_read_only_token_may_ask_for_gradients(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("full-1\nread-1 read\n")
    srv = ServerProcess(tmp_path / "data", "--auth-token-file", str(tokens))
    try:
        with Client(srv.address, token="full-1") as full:
            full.create_model("m", "small_mlp")
            full.upload("m", reference_module("small_mlp", False).state_dict())
        with Client(srv.address, token="read-1") as reader:
            got = reader.gradients("m", example_input("small_mlp", False))
            assert set(got.grads) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    finally:
        srv.stop()


def test_cli_grad_prints_a_table_json_and_saves(server, client, model_name, tmp_path):
    client.create_model(model_name, "tied_mlp")
    module = reference_module("tied_mlp", False)
    client.upload(model_name, module.state_dict())
    x = example_input("tied_mlp", False, seed=5)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", np.zeros((2, 1), np.float32))
    base = [sys.executable, "-m", "paramserve.service.cli", "--server", server.address, "grad",
            model_name, "--input", str(tmp_path / "x.npy")]

    def run(*extra):
        result = subprocess.run(base + list(extra), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    table = run()
    assert "loss sum" in table and "NORM" in table and "4.weight" in table
    shown = json.loads(run("--target", str(tmp_path / "y.npy"), "--param", "2", "--json"))
    assert [g["name"] for g in shown["gradients"]] == ["2.weight", "2.bias"]
    assert shown["gradients"][0]["tied_with"] == ["4.weight"]
    _, expected = in_process(module, x, "mse", torch.zeros(2, 1))
    assert shown["loss"] == pytest.approx(F.mse_loss(module(x), torch.zeros(2, 1)).item())
    assert shown["gradients"][0]["norm"] == pytest.approx(expected["2.weight"].norm().item())
    run("-o", str(tmp_path / "g.npz"))
    run("-o", str(tmp_path / "g.safetensors"), "--loss", "sum")
    from safetensors.numpy import load_file

    saved, npz = load_file(str(tmp_path / "g.safetensors")), np.load(tmp_path / "g.npz")
    _, summed = in_process(module, x, "sum")
    for name, grad in summed.items():
        np.testing.assert_array_equal(saved[name], grad.numpy())
        np.testing.assert_array_equal(npz[name], grad.numpy())
    bad = subprocess.run(base + ["--param", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "nope" in bad.stderr


# ---- the plain function (registry/gradients.py), as Train uses it --------------------------

def test_the_function_copies_a_module_built_under_inference_mode_and_keeps_ties():
    from paramserve.registry.gradients import gradients

    with torch.inference_mode():  # parameters that are inference tensors, as a served module's
        module = reference_module("tied_mlp", False)
    x = example_input("tied_mlp", False, seed=3)
    result = gradients(module, (x,), loss="sum")
    assert result.grads["2.weight"] is result.grads["4.weight"]
    assert result.tied["2.bias"] == ("4.bias",)
    assert all(p.grad is None for p in module.parameters())
    with pytest.raises(InvalidArgument, match="exactly one"):
        gradients(module, (x,), loss=None)
    with pytest.raises(InvalidArgument, match="buffer"):  # fixed_hidden_mlp's constant
        gradients(reference_module("fixed_hidden_mlp", False),
                  (example_input("fixed_hidden_mlp", False),), loss="sum", params=["rand_weight"])

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_function_runs_on_the_modules_device():
    from paramserve.registry.gradients import gradients

    module = reference_module("mlp", False)
    x = example_input("mlp", False, seed=1)
    on_cpu = gradients(module, (x,), loss="sum")
    on_gpu = gradients(copy.deepcopy(module).to("cuda:0"), (x,), loss="sum")
    for name, grad in on_cpu.grads.items():
        assert on_gpu.grads[name].device.type == "cpu"
        assert torch.allclose(on_gpu.grads[name], grad, rtol=1e-4, atol=1e-5), name
    again = gradients(copy.deepcopy(module).to("cuda:0"), (x,), loss="sum")
    assert all(torch.equal(again.grads[n], g) for n, g in on_gpu.grads.items())
