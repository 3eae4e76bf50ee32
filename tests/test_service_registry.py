"""The Registry service over gRPC: streamed uploads and downloads, parameters, init, patch,
errors with their status codes, health, reflection, metrics and graceful shutdown."""

from __future__ import annotations

import hashlib
import io
import signal
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save as st_save

from paramserve.protos import registry_pb2 as pb
from paramserve.protos import registry_pb2_grpc
from paramserve.registry import (AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument,
                                 NotFound)
from paramserve.service import client_files
from paramserve.service.client import Client

from conftest import ServerProcess, metrics_text, reference_module


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_download_gives_back_a_bit_identical_state_dict(client, model_name, tmp_path):
    client.create_model(model_name, "tied_mlp")
    state = reference_module("tied_mlp", False).state_dict()
    client.upload(model_name, state)
    downloaded = client.state_dict(model_name)
    assert same_state(downloaded, state) and downloaded["4.weight"] is downloaded["2.weight"]
    version = client.download(model_name, "1", tmp_path / "v1.pt")
    loaded = torch.load(tmp_path / "v1.pt", weights_only=True)
    assert same_state(loaded, state)
    # as stored: the blob byte for byte (a plain download gives each tied name its own copy)
    client.download(model_name, None, tmp_path / "v1.safetensors", as_stored=True)
    raw = (tmp_path / "v1.safetensors").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == version.sha256


def test_a_large_upload_streams_in_many_chunks(client, model_name, tmp_path):
    client.create_model(model_name, "sequential_mlp", {"hidden": 40_000})  # ~3.7 MiB
    from paramserve.registry import get_architecture

    module = get_architecture("sequential_mlp").build({"hidden": 40_000}, seed=1)
    path = tmp_path / "big.safetensors"
    path.write_bytes(st_save(module.state_dict()))
    seen = []
    version = client.upload(model_name, path, progress=lambda done, total: seen.append(done))
    assert len(seen) >= 3 and seen[-1] == path.stat().st_size
    back = []
    client.download(model_name, version.number, tmp_path / "back.safetensors",
                    progress=lambda done, total: back.append((done, total)))
    assert len(back) >= 3 and back[-1][0] == back[-1][1]
    x = torch.rand(2, 20)
    assert (client.infer(model_name, x) - module(x)).abs().max() <= 1e-5


def test_parameter_queries_match_named_parameters_and_state_dict(client, model_name):
    client.create_model(model_name, "rgnet")
    module = reference_module("rgnet", False)
    client.upload(model_name, module.state_dict())
    infos = client.parameters(model_name, stats=True)
    assert [p.name for p in infos] == [n for n, _ in module.named_parameters()]
    assert infos[0].name == "0.block 0.0.weight" and infos[0].spec.shape == (8, 4)
    assert infos[0].stats.max == pytest.approx(module[0][0][0].weight.max().item())
    bias = client.tensor(model_name, "0.block 1.0.bias")  # numpy: the client needs no torch
    assert torch.equal(torch.from_numpy(bias), module[0][1][0].bias.detach())
    assert torch.equal(torch.from_numpy(client.tensor(model_name, "0.block 1.0.weight",
                                                      index="0, 1:3")),
                       module[0][1][0].weight.detach()[0, 1:3])
    assert client.module_tree(model_name) == str(module)


def test_tied_and_lazy_entries_are_reported(client, model_name):
    client.create_model(model_name, "tied_mlp", {"in_features": None})
    infos = {p.name: p for p in client.parameters(model_name)}
    assert not infos["0.weight"].initialized and infos["0.weight"].spec.shape is None
    assert infos["2.weight"].tied_with == ("4.weight",)
    assert "LazyLinear" in client.module_tree(model_name)
    client.infer(model_name, torch.rand(2, 6))
    infos = {p.name: p for p in client.parameters(model_name)}
    assert infos["0.weight"].initialized and infos["0.weight"].spec.shape == (8, 6)


def test_init_and_patch_over_the_wire(client, model_name):
    client.create_model(model_name, "small_mlp")
    client.upload(model_name, reference_module("small_mlp", False).state_dict())
    v2 = client.initialize(model_name, "my_init", module_path="0", seed=7)
    assert (v2.number, v2.origin, v2.parent) == (2, "init", 1)
    w = client.tensor(model_name, "0.weight")
    assert ((w == 0) | (abs(w) >= 5)).all()
    v3 = client.patch(model_name, "0.weight", 42, index="0, 0")
    v4 = client.patch(model_name, "2.bias", [0.5], op="add", ref="3")
    assert (v3.parent, v4.parent) == (2, 3)
    assert client.tensor(model_name, "0.weight", index="0, 0").item() == 42
    module = reference_module("small_mlp", False)
    module.load_state_dict(client.state_dict(model_name))
    x = torch.rand(3, 4)
    assert torch.allclose(client.infer(model_name, x), module(x), atol=1e-6)


def test_lazy_init_over_the_wire_with_an_input_shape(client, model_name):
    client.create_model(model_name, "my_linear_net", {"in_features": None})
    version = client.initialize(model_name, "zeros", input_shape=(1, 16))
    assert {e.name: e.spec.shape for e in version.manifest}["0.weight"] == (16, 8)


def test_every_registry_error_status(client, model_name, server, tmp_path):
    with pytest.raises(NotFound, match="paramserve create"):
        client.get_model("absent")
    client.create_model(model_name, "mlp")
    with pytest.raises(AlreadyExists):
        client.create_model(model_name, "mlp")
    with pytest.raises(InvalidArgument, match="no config key"):
        client.create_model(model_name + "x", "mlp", {"widht": 3})
    bad = reference_module("mlp", False).state_dict()
    del bad["out.bias"]
    with pytest.raises(InvalidArgument, match="missing keys: 'out.bias'"):
        client.upload(model_name, bad)
    with pytest.raises(NotFound, match="no versions yet"):
        client.patch(model_name, "out.bias", 1.0)
    with pytest.raises(InvalidArgument, match="unknown init scheme"):
        client.initialize(model_name, "gaussian")
    with pytest.raises(NotFound, match="no versions yet"):
        client.download(model_name, None, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_full_model_version_with_no_versions_yet_is_a_failed_precondition(client, model_name):
    client.create_model(model_name, "mlp")
    with pytest.raises(FailedPrecondition, match="no version to serve"):
        client.infer(model_name, torch.rand(1, 20))


def test_upload_streams_that_lie_are_refused(client, model_name, server):
    client.create_model(model_name, "small_mlp")
    data = st_save(reference_module("small_mlp", False).state_dict())
    stub = registry_pb2_grpc.RegistryStub(client.channel)
    good = hashlib.sha256(data).hexdigest()

    def send(header, chunks):
        return stub.UploadVersion(iter([pb.UploadChunk(header=header)] +
                                       [pb.UploadChunk(data=c) for c in chunks]))

    cases = [
        (pb.UploadHeader(model=model_name, sha256="0" * 64, size_bytes=len(data)), [data],
         "sha256"),
        (pb.UploadHeader(model=model_name, sha256=good, size_bytes=len(data) + 5), [data],
         "ended after"),
        (pb.UploadHeader(model=model_name, sha256=good, size_bytes=len(data) - 1), [data],
         "more than"),
        (pb.UploadHeader(model=model_name, sha256="abc", size_bytes=len(data)), [data],
         "64-hex-digit"),
    ]
    for header, chunks, message in cases:
        with pytest.raises(grpc.RpcError) as info:
            send(header, chunks)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.UploadVersion(iter([pb.UploadChunk(data=data)]))
    assert "must start with a header" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        send(pb.UploadHeader(model=model_name, sha256=good, size_bytes=65 << 20), [])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.list_versions(model_name) == []
    assert list((server.data_dir / "spool").iterdir()) == []


def test_a_corrupt_blob_is_data_loss(client, model_name, server, tmp_path):
    client.create_model(model_name, "small_mlp")
    version = client.upload(model_name, reference_module("small_mlp", False, seed=77)
                            .state_dict())
    blob = next((server.data_dir / "blobs" / "sha256").rglob(f"{version.sha256}*"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(DataLoss, match=version.sha256):
        client.infer(model_name, torch.rand(1, 4))
    with pytest.raises(DataLoss):
        client.download(model_name, None, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_health_reflection_and_metrics(client, server, model_name):
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "inference.GRPCInferenceService", "paramserve.v1.Registry"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"inference.GRPCInferenceService", "paramserve.v1.Registry"} <= names
    client.create_model(model_name, "small_mlp")
    client.upload(model_name, reference_module("small_mlp", False).state_dict())
    client.infer(model_name, torch.rand(2, 4))
    text = metrics_text(server.metrics_port)
    assert 'paramserve_requests_total{code="OK",method="ModelInfer"}' in text
    assert "paramserve_request_seconds_bucket" in text
    assert 'paramserve_bytes_total{direction="upload"}' in text
    assert "paramserve_loaded_models" in text


def test_sigterm_lets_an_in_flight_upload_finish(tmp_path):
    srv = ServerProcess(tmp_path / "data", "--grace-s", "30")
    try:
        from paramserve.registry import get_architecture
        module = get_architecture("sequential_mlp").build({"hidden": 200_000}, seed=0)  # ~18 MiB
        path = tmp_path / "big.safetensors"
        path.write_bytes(st_save(module.state_dict()))
        with Client(srv.address) as client:
            client.create_model("big", "sequential_mlp", {"hidden": 200_000})
            started, result = threading.Event(), {}

            def progress(done, total):
                started.set()
                time.sleep(0.01)  # a slow client: the upload is still running at SIGTERM

            def upload():
                try:
                    result["version"] = client.upload("big", path, progress=progress)
                except Exception as err:  # asserted below
                    result["error"] = err

            thread = threading.Thread(target=upload)
            thread.start()
            assert started.wait(30)
            srv.proc.send_signal(signal.SIGTERM)
            thread.join(60)
        assert "error" not in result and result["version"].number == 1
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
    restarted = ServerProcess(tmp_path / "data")
    try:
        with Client(restarted.address) as client:
            assert [v.number for v in client.list_versions("big")] == [1]
    finally:
        restarted.stop()


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.path}",))


def test_a_malicious_pickle_upload_never_runs(client, model_name, server, tmp_path,
                                              monkeypatch):
    marker = tmp_path / "pwned"
    state = dict(reference_module("small_mlp", False).state_dict())
    state["0.weight"] = Exploit(marker)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    client.create_model(model_name, "small_mlp")
    with pytest.raises(InvalidArgument, match="^the upload pickles 'posix.system'"):
        client.upload(model_name, buffer.getvalue())  # the client reads its opcodes first
    monkeypatch.setattr(client_files, "check_upload", lambda *args: None)
    with pytest.raises(InvalidArgument, match="^upload pickles 'posix.system'"):
        client.upload(model_name, buffer.getvalue())  # so does the server, before torch.load
    assert not marker.exists() and client.list_versions(model_name) == []
    assert list((server.data_dir / "spool").iterdir()) == []
