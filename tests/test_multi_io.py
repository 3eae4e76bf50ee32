"""Several inputs and outputs through a real server: declared inputs decoded and checked as one,
batched across concurrent requests (each input along its batch dim), tuple and dict outputs
named by the signature, requested outputs, Triton's classification extension, and the errors a
caller gets (missing, unexpected, disagreeing rows) apart from a model's own failure."""

from __future__ import annotations

import concurrent.futures
import importlib
import json
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from paramserve.protos import inference_pb2 as pb
from paramserve.protos import inference_pb2_grpc
from paramserve.registry import get_architecture
from paramserve.registry.errors import InvalidArgument
from paramserve.service.client import Client

from conftest import ServerProcess, wait_for

USER_ARCHITECTURES = '''
import torch
from torch import nn
from paramserve.registry.architectures import Input, architecture

PAIR = [Input("a", torch.float32, (-1, 4)), Input("b", torch.float32, (-1, 3))]


class PairTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, a, b):
        h = self.lin(a)
        return h * b, (h - b).sum(dim=1, keepdim=True)


class PairDict(PairTuple):
    def forward(self, a, b):
        h = self.lin(a)
        return {"logits": h + b, "norm": h.norm(dim=1)}


class Columns(nn.Module):
    """Rows along dim 1 (batch_dim=1): each column a sample."""
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.arange(1.0, 4.0).reshape(3, 1))

    def forward(self, x):
        return x * self.scale


class Fragile(nn.Module):
    """Accepts its declared shape, then fails on a value (a bug in the model)."""
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        if x.device.type != "meta" and bool((x > 100).any()):
            raise RuntimeError("index 7 is out of bounds for dimension 0 with size 2")
        return self.lin(x)


@architecture("test_pair_tuple", inputs=PAIR)
def pair_tuple():
    return PairTuple()


@architecture("test_pair_dict", inputs=PAIR)
def pair_dict():
    return PairDict()


@architecture("test_pair_named", inputs=PAIR, outputs=["scaled", "distance"])
def pair_named():
    return PairTuple()


@architecture("test_columns", inputs=[Input("x", torch.float32, (3, -1), batch_dim=1)])
def columns():
    return Columns()


class PairMixing(nn.Module):
    """Claims batchable, but mixes rows: b's mean over the batch."""
    def forward(self, a, b):
        return a + b.mean(dim=0, keepdim=True)


@architecture("test_pair_mixing", inputs=[Input("a", torch.float32, (-1, 3)),
                                          Input("b", torch.float32, (-1, 3))])
def pair_mixing():
    return PairMixing()


@architecture("test_fragile", example_input_shape=(2, 2))
def fragile():
    return Fragile()
'''


@pytest.fixture(scope="module")
def multi_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    (root / "multi_archs.py").write_text(USER_ARCHITECTURES)
    sys.path.insert(0, str(root))  # the test builds the same modules in-process
    importlib.import_module("multi_archs")
    srv = ServerProcess(root / "data", "--architectures", "multi_archs",
                        env={"PYTHONPATH": os.pathsep.join(
                            [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])})
    yield srv
    srv.stop()


@pytest.fixture
def mclient(multi_server):
    with Client(multi_server.address, timeout_s=60) as client:
        yield client


def stub_of(client: Client):
    return inference_pb2_grpc.GRPCInferenceServiceStub(client.channel)


def uploaded(client: Client, name: str, arch: str, seed: int = 1) -> torch.nn.Module:
    """A model created and uploaded from the module built in-process (the reference)."""
    module = get_architecture(arch).build({}, seed=seed)
    client.create_model(name, arch)
    if module.state_dict():
        client.upload(name, module.state_dict())
    return module.eval()


def pair_inputs(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, generator=g), torch.randn(rows, 3, generator=g)


def request_of(name: str, **tensors: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name)
    for key, array in tensors.items():
        request.inputs.add(name=key, datatype="FP32", shape=list(array.shape))
        request.raw_input_contents.append(np.ascontiguousarray(array, np.float32).tobytes())
    return request


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_two_inputs_batched_concurrently_equal_the_in_process_forward(mclient, multi_server):
    module = uploaded(mclient, "pair", "test_pair_tuple")
    stub = stub_of(mclient)

    def batched_sizes() -> list[int]:
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="pair")).model_stats
        return [b.batch_size for s in stats for b in s.batch_stats]

    def one(seed: int):
        a, b = pair_inputs(1 + seed % 3, seed)
        with Client(multi_server.address, timeout_s=60) as client:
            return a, b, client.infer("pair", {"a": a, "b": b})

    # Generous under load: rounds of 32 concurrent requests until one batch merged requests.
    for round_ in range(10):
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(round_ * 32, round_ * 32 + 32)))
        for a, b, got in results:
            with torch.no_grad():
                want = module(a, b)
            assert set(got) == {"OUTPUT0", "OUTPUT1"}
            assert torch.allclose(got["OUTPUT0"], want[0], atol=1e-6)
            assert torch.allclose(got["OUTPUT1"], want[1], atol=1e-6)
        if max(batched_sizes()) > 3:  # more rows than one request sends: requests merged
            break
    assert max(batched_sizes()) > 3, batched_sizes()


def test_metadata_and_config_follow_the_signature(mclient):
    uploaded(mclient, "named", "test_pair_named")
    uploaded(mclient, "dict", "test_pair_dict")
    stub = stub_of(mclient)
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="named"))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("a", "FP32", [-1, 4]), ("b", "FP32", [-1, 3])]
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [
        ("scaled", [-1, 3]), ("distance", [-1, 1])]
    assert [t.name for t in stub.ModelMetadata(pb.ModelMetadataRequest(name="dict")).outputs] == [
        "logits", "norm"]
    config = stub.ModelConfig(pb.ModelConfigRequest(name="named")).config
    assert config.max_batch_size > 1
    assert [(t.name, list(t.dims)) for t in config.input] == [("a", [4]), ("b", [3])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("scaled", [3]), ("distance", [1])]


def test_dict_outputs_and_requested_outputs(mclient):
    module = uploaded(mclient, "dict2", "test_pair_dict")
    a, b = pair_inputs(3, 7)
    with torch.no_grad():
        want = module(a, b)
    got = mclient.infer("dict2", {"a": a, "b": b})
    assert torch.allclose(got["logits"], want["logits"], atol=1e-6)
    assert torch.allclose(got["norm"], want["norm"], atol=1e-6)

    stub = stub_of(mclient)
    request = request_of("dict2", b=b.numpy(), a=a.numpy())  # any order: matched by name
    request.outputs.add(name="norm")
    response = stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["norm"]
    norm = np.frombuffer(response.raw_output_contents[0], np.float32)
    assert np.allclose(norm, want["norm"].numpy(), atol=1e-6)

    request.outputs.add(name="nope")
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no output(s) ['nope']" in err.details() and "'logits', 'norm'" in err.details()


def test_class_count_is_top_k_score_index_strings_as_triton(mclient, multi_server):
    module = uploaded(mclient, "cls", "test_pair_named")
    a, b = pair_inputs(4, 11)
    with torch.no_grad():
        scaled = module(a, b)[0]
    client = grpcclient.InferenceServerClient(url=multi_server.address)
    inputs = [grpcclient.InferInput("a", [4, 4], "FP32"),
              grpcclient.InferInput("b", [4, 3], "FP32")]
    inputs[0].set_data_from_numpy(a.numpy())
    inputs[1].set_data_from_numpy(b.numpy())
    result = client.infer("cls", inputs, outputs=[
        grpcclient.InferRequestedOutput("scaled", class_count=2),
        grpcclient.InferRequestedOutput("distance")])
    top = result.as_numpy("scaled")
    assert top.shape == (4, 2)
    values, indices = torch.topk(scaled, 2, dim=1)
    for row in range(4):
        parsed = [entry.decode().split(":") for entry in top[row]]
        assert [int(i) for _, i in parsed] == indices[row].tolist()
        assert np.allclose([float(v) for v, _ in parsed], values[row].numpy(), atol=1e-5)
    assert result.as_numpy("distance").shape == (4, 1)  # not classified: the tensor itself
    # More classes than there are: every class, as Triton clamps.
    result = client.infer("cls", inputs, outputs=[
        grpcclient.InferRequestedOutput("scaled", class_count=10)])
    assert result.as_numpy("scaled").shape == (4, 3)
    assert "classification" in client.get_server_metadata().extensions
    client.close()


def test_missing_unexpected_and_disagreeing_inputs_are_invalid_argument(mclient):
    uploaded(mclient, "errs", "test_pair_tuple")
    stub = stub_of(mclient)
    a, b = pair_inputs(2, 3)
    err = rpc_error(lambda: stub.ModelInfer(request_of("errs", a=a.numpy(), c=b.numpy(),
                                                       d=b.numpy())))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details()  # every problem in one message
    assert "has no input 'c'" in details and "has no input 'd'" in details
    assert "needs input 'b'" in details and "its inputs: ['a', 'b']" in details
    err = rpc_error(lambda: stub.ModelInfer(request_of("errs", a=a.numpy())))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs input 'b'" in err.details()
    err = rpc_error(lambda: stub.ModelInfer(request_of("errs", a=a.numpy(), b=b[:1].numpy())))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "agree on their batch size" in err.details()
    err = rpc_error(lambda: stub.ModelInfer(request_of("errs", a=a.numpy(), b=a.numpy())))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "has shape [2, 4]" in err.details()
    duplicated = request_of("errs", a=a.numpy(), b=b.numpy())
    duplicated.inputs.add(name="a", datatype="FP32", shape=[2, 4])
    duplicated.raw_input_contents.append(a.numpy().tobytes())
    err = rpc_error(lambda: stub.ModelInfer(duplicated))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "input 'a' twice" in err.details()


def test_a_forward_failing_on_an_accepted_input_is_internal_not_the_callers_fault(
        mclient, multi_server):
    uploaded(mclient, "fragile", "test_fragile")
    stub = stub_of(mclient)
    x = np.ones((2, 2), np.float32)
    assert stub.ModelInfer(request_of("fragile", input=x)).outputs[0].shape == [2, 2]
    err = rpc_error(lambda: stub.ModelInfer(request_of("fragile", input=x * 1000)))
    assert err.code() == grpc.StatusCode.INTERNAL
    # The client is told which model failed and that it is the model's bug, not its own.
    assert "model 'fragile' failed on an input its signature accepts" in err.details()
    # The shape check is the codec's, before the forward: still the caller's to fix.
    err = rpc_error(lambda: stub.ModelInfer(request_of("fragile", input=np.ones((2, 3)))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "has shape [2, 3]" in err.details()
    log = multi_server.log_path
    assert wait_for(lambda: "model 'fragile'" in log.read_text() and
                    "signature accepts" in log.read_text())


def test_batch_dim_other_than_the_first(mclient, multi_server):
    module = uploaded(mclient, "cols", "test_columns")
    meta = stub_of(mclient).ModelMetadata(pb.ModelMetadataRequest(name="cols"))
    assert list(meta.inputs[0].shape) == [3, -1] and list(meta.outputs[0].shape) == [3, -1]

    def one(seed: int):
        x = torch.randn(3, 1 + seed % 4, generator=torch.Generator().manual_seed(seed))
        with Client(multi_server.address, timeout_s=60) as client:
            return x, client.infer("cols", {"x": x})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for x, y in pool.map(one, range(48)):
            with torch.no_grad():
                assert torch.allclose(y, module(x), atol=1e-6)


def test_cli_infer_takes_named_inputs(mclient, multi_server, tmp_path):
    module = uploaded(mclient, "cli-pair", "test_pair_named")
    a, b = pair_inputs(2, 5)
    np.save(tmp_path / "a.npy", a.numpy())
    np.save(tmp_path / "b.npy", b.numpy())
    run = subprocess.run(
        [sys.executable, "-m", "paramserve.service.cli", "infer", "cli-pair", "--server",
         multi_server.address, "--input", f"a={tmp_path / 'a.npy'}", "--input",
         f"b={tmp_path / 'b.npy'}", "--output", f"scaled={tmp_path / 's.npy'}"],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    with torch.no_grad():
        want = module(a, b)
    assert np.allclose(np.load(tmp_path / "s.npy"), want[0].numpy(), atol=1e-6)
    printed = subprocess.run(
        [sys.executable, "-m", "paramserve.service.cli", "infer", "cli-pair", "--server",
         multi_server.address, "--input", f"a={tmp_path / 'a.npy'}", "--input",
         f"b={tmp_path / 'b.npy'}"], capture_output=True, text=True, timeout=120)
    shown = json.loads(printed.stdout)
    assert set(shown) == {"scaled", "distance"} and shown["distance"]["shape"] == [2, 1]


def test_simple_through_paramserves_client(mclient):
    mclient.create_model("simple-p", "simple")  # no parameters: servable at once (version 1)
    x0 = np.arange(32, dtype=np.int32).reshape(2, 16)
    x1 = np.full((2, 16), 3, np.int32)
    out = mclient.infer("simple-p", {"INPUT0": x0, "INPUT1": x1})
    assert np.array_equal(out["OUTPUT0"], x0 + x1) and np.array_equal(out["OUTPUT1"], x0 - x1)
    with pytest.raises(InvalidArgument, match="the model takes INT32"):
        mclient.infer("simple-p", {"INPUT0": x0.astype(np.float32), "INPUT1": x1})


def test_the_registry_reports_declared_inputs_and_the_signature(mclient):
    archs = {a.name: a for a in mclient.architectures()}
    simple = archs["simple"]
    assert [(i.name, i.datatype, list(i.shape), i.batch_dim) for i in simple.inputs] == [
        ("INPUT0", "INT32", [-1, 16], 0), ("INPUT1", "INT32", [-1, 16], 0)]
    assert list(simple.outputs) == ["OUTPUT0", "OUTPUT1"]
    assert list(archs["mlp"].inputs) == []  # the default: one "input"
    uploaded(mclient, "described", "test_columns")
    from paramserve.protos import registry_pb2

    described = mclient.registry.DescribeModule(
        registry_pb2.DescribeModuleRequest(model="described"))
    assert described.version == 1
    assert [(t.name, list(t.shape), t.batch_dim) for t in described.inputs] == [("x", [3, -1], 1)]
    assert [(t.name, list(t.shape), t.batch_dim) for t in described.outputs] == [
        ("output", [3, -1], 1)]


def test_classification_strings_are_tritons_for_integers_and_one_row():
    from paramserve.service import codec
    from paramserve.service.wire import bytes_output

    response = pb.ModelInferResponse()
    codec.encode_classification(response, "ints", torch.tensor([[1, 5, 3], [9, 2, 4]],
                                                               dtype=torch.int32), 2)
    codec.encode_classification(response, "one", torch.tensor([0.5, 0.25, 0.75]), 5)
    assert bytes_output(response, 0).tolist() == [[b"5:1", b"3:2"], [b"9:0", b"4:2"]]
    assert bytes_output(response, 1).tolist() == [b"0.750000:2", b"0.500000:0", b"0.250000:1"]


def test_the_load_probe_finds_a_two_input_model_that_mixes_rows(mclient, multi_server):
    mclient.create_model("mixing", "test_pair_mixing")  # no parameters: version 1 already
    config = stub_of(mclient).ModelConfig(pb.ModelConfigRequest(name="mixing")).config
    assert config.max_batch_size > 1  # as declared, until loaded

    def one(seed: int):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
        with Client(multi_server.address, timeout_s=60) as client:
            return x, y, client.infer("mixing", {"a": x, "b": y})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for x, y, out in pool.map(one, range(32)):
            assert torch.allclose(out, x + y.mean(dim=0, keepdim=True), atol=1e-6)
    config = stub_of(mclient).ModelConfig(pb.ModelConfigRequest(name="mixing")).config
    assert config.max_batch_size == 0  # the probe found it out: never batched


def test_batcher_merges_and_splits_tuples_along_each_batch_dim():
    import asyncio
    import time
    from concurrent.futures import ThreadPoolExecutor

    from paramserve.service.batcher import Batcher

    seen = []

    def forward(xs):
        a, b = xs  # a: rows on dim 0, b: rows on dim 1
        time.sleep(0.05)
        seen.append((tuple(a.shape), tuple(b.shape)))
        return a * 2, b.t() + 1  # outputs: rows on dim 0, both

    async def scenario():
        batcher = Batcher(forward, ThreadPoolExecutor(1), max_batch_size=64,
                          input_dims=(0, 1), output_dims=(0, 0))
        parts = [(torch.full((n, 2), float(n)), torch.full((3, n), float(-n))) for n in (1, 2, 3)]
        first = asyncio.ensure_future(batcher.submit(parts[0]))
        await asyncio.sleep(0.01)  # busy with the first: the others queue and merge
        rest = await asyncio.gather(*(batcher.submit(p) for p in parts[1:]))
        return parts, [await first, *rest]

    parts, results = asyncio.run(scenario())
    assert seen[1] == ((5, 2), (3, 5))  # 2 + 3 rows in one forward
    for (a, b), (y0, y1) in zip(parts, results):
        assert torch.equal(y0, a * 2) and torch.equal(y1, b.t() + 1)


def _x(shape=(-1,), batch_dim=0, example=None):
    from paramserve.registry.architectures import Input

    return Input("x", torch.float32, shape, batch_dim, example)


@pytest.mark.parametrize("declaration, message", [
    (lambda: dict(inputs=[]), "non-empty list of Input"),
    (lambda: dict(inputs=["x"]), "non-empty list of Input"),
    (lambda: dict(inputs=[_x(), _x()]), "must be distinct"),
    (lambda: dict(inputs=[_x((0, 2))]), "positive sizes or -1"),
    (lambda: dict(inputs=[_x((-1, 2), 2)]), "batch_dim 2 outside its shape"),
    (lambda: dict(inputs=[_x((-1, 2), 0, (2, 3))]), "does not fit its shape"),
    (lambda: dict(inputs=[_x()], defaults={"in_features": 4}), "lazy 'in_features'"),
    (lambda: dict(inputs=[_x()], outputs=["y", "y"]), "output names must be distinct"),
    (lambda: dict(), "needs example_input_shape or inputs"),
])
def test_a_declaration_that_cannot_be_served_is_refused_at_registration(declaration, message):
    from paramserve.registry.architectures import architecture

    with pytest.raises(InvalidArgument, match=message):
        architecture("test_refused", **declaration())(torch.nn.Identity)
