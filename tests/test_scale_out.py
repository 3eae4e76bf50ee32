"""Three replicas on one PostgreSQL registry and one shared blob directory, on loopback."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch
from safetensors.torch import save as st_save

from paramserve.protos import inference_pb2 as pb
from paramserve.protos import inference_pb2_grpc
from paramserve.registry import get_architecture
from paramserve.service.client import Client

from conftest import ServerProcess, fresh_postgres_database, reference_module

SYNC_INTERVAL_S = 0.2
AGREE_WITHIN_S = 5.0  # what the test allows; expected is about SYNC_INTERVAL_S


def start_replica(url, shared, name):
    return ServerProcess(shared, "--registry-url", url, "--sync-interval-s", str(SYNC_INTERVAL_S),
                         log_name=name)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared") / "data"
    with fresh_postgres_database() as url:
        servers = {name: start_replica(url, shared, name) for name in "ABC"}
        clients = {name: Client(srv.address) for name, srv in servers.items()}
        yield url, shared, servers, clients
        for client in clients.values():
            client.close()
        for srv in servers.values():
            srv.stop()


def eventually(check, within_s: float = AGREE_WITHIN_S):
    deadline = time.monotonic() + within_s
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_upload_to_a_is_served_identically_by_b_and_c(replicas):
    _, _, _, clients = replicas
    module = reference_module("chimera", False)
    clients["A"].create_model("shared-chimera", "chimera")
    clients["A"].upload("shared-chimera", module.state_dict())
    x = torch.rand(3, 20)
    outputs = [clients[n].infer("shared-chimera", x) for n in "BC"]
    assert torch.equal(outputs[0], outputs[1])
    assert (outputs[0] - module(x)).abs().max() <= 1e-6


def test_an_alias_moved_on_c_is_served_by_a(replicas):
    _, _, _, clients = replicas
    first, second = (reference_module("small_mlp", False, seed=s) for s in (1, 2))
    clients["C"].create_model("moving", "small_mlp")
    clients["C"].upload("moving", first.state_dict(), alias="production")
    clients["C"].upload("moving", second.state_dict())
    x = torch.rand(2, 4)
    assert torch.allclose(clients["A"].infer("moving", x, "production"), first(x), atol=1e-6)
    clients["C"].set_alias("moving", "production", 2)
    moved = time.monotonic()

    def a_serves_the_second():
        assert torch.allclose(clients["A"].infer("moving", x, "production"), second(x),
                              atol=1e-6)

    eventually(a_serves_the_second)
    assert time.monotonic() - moved <= AGREE_WITHIN_S


def test_lazy_first_requests_on_two_replicas_create_one_version(replicas):
    _, _, servers, clients = replicas
    clients["A"].create_model("lazy-race", "rgnet", {"in_features": None}, seed=9)
    x = torch.rand(2, 6)
    request = pb.ModelInferRequest(model_name="lazy-race")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 6])
    request.raw_input_contents.append(x.numpy().tobytes())
    stubs = [inference_pb2_grpc.GRPCInferenceServiceStub(clients[n].channel) for n in "BC"]
    futures = [stubs[i % 2].ModelInfer.future(request, timeout=120) for i in range(16)]
    outputs = [torch.frombuffer(bytearray(f.result().raw_output_contents[0]),
                                dtype=torch.float32) for f in futures]
    # equal up to float rounding: batched rows may take another BLAS path
    assert all((o - outputs[0]).abs().max() <= 1e-6 for o in outputs)
    assert [(v.number, v.origin) for v in clients["A"].list_versions("lazy-race")] == [
        (1, "lazy-init")]


def test_two_replicas_writing_the_same_blob_leave_one_correct_file(replicas):
    _, shared, _, clients = replicas
    clients["A"].create_model("same-bytes", "nest_mlp")
    state = reference_module("nest_mlp", False, seed=4).state_dict()
    results = {}

    def upload(name):
        results[name] = clients[name].upload("same-bytes", state)

    threads = [threading.Thread(target=upload, args=(n,)) for n in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["A"].sha256 == results["B"].sha256
    assert sorted(v.number for v in results.values()) == [1, 2]
    blobs = list((shared / "blobs" / "sha256").rglob(f"{results['A'].sha256}*"))
    assert len(blobs) == 1
    downloaded = clients["C"].state_dict("same-bytes", 2)
    assert all(torch.equal(downloaded[k], v) for k, v in state.items())


def test_killing_a_replica_mid_upload_loses_nothing(replicas, tmp_path):
    url, shared, servers, clients = replicas
    clients["A"].create_model("survivor", "sequential_mlp", {"hidden": 200_000})
    module = get_architecture("sequential_mlp").build({"hidden": 200_000}, seed=0)  # ~18 MiB
    clients["A"].upload("survivor", module.state_dict(), alias="production")
    before = [v.sha256 for v in clients["A"].list_versions("survivor")]
    path = tmp_path / "next.safetensors"
    path.write_bytes(st_save(get_architecture("sequential_mlp").build({"hidden": 200_000},
                                                                      seed=1).state_dict()))
    started, result = threading.Event(), {}
    victim = Client(servers["B"].address)

    def progress(done, total):
        started.set()
        time.sleep(0.02)

    def upload():
        try:
            result["version"] = victim.upload("survivor", path, progress=progress)
        except Exception as err:  # expected: the server dies
            result["error"] = err

    thread = threading.Thread(target=upload)
    thread.start()
    assert started.wait(30)
    servers["B"].proc.send_signal(signal.SIGKILL)
    thread.join(60)
    victim.close()
    assert "error" in result
    for name in "AC":
        assert [v.sha256 for v in clients[name].list_versions("survivor")] == before
    referenced = {v.sha256 for n in ("survivor",) for v in clients["A"].list_versions(n)}
    on_disk = {p.name.split(".")[0] for p in (shared / "blobs" / "sha256").rglob("*.safetensors")}
    assert referenced <= on_disk
    x = torch.rand(2, 20)
    assert (clients["C"].infer("survivor", x, "production") - module(x)).abs().max() <= 1e-5
    servers["B"] = start_replica(url, shared, "B2")  # a replacement joins the same registry
    with Client(servers["B"].address) as client:
        assert [v.sha256 for v in client.list_versions("survivor")] == before
