"""Every limit is configurable and answered with RESOURCE_EXHAUSTED and a message."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from paramserve.protos import registry_pb2 as rpb
from paramserve.protos import registry_pb2_grpc
from paramserve.registry import ResourceExhausted
from paramserve.service.client import Client

from conftest import ServerProcess, reference_module


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("tight") / "data", "--max-message-mb", "1",
                        "--max-concurrent-rpcs", "2", "--max-upload-mb", "1",
                        "--max-tensor-elements", "1000")
    with Client(srv.address) as client:
        client.create_model("c", "centered_layer")
        client.upload("c", {})
    yield srv
    srv.stop()


def test_message_size_limit(tight_server):
    with Client(tight_server.address, max_message_mb=8) as client:
        with pytest.raises(ResourceExhausted):
            client.infer("c", torch.zeros(300_000))  # 1.2 MB in one message


def test_tensor_elements_limit(tight_server):
    with Client(tight_server.address) as client:
        with pytest.raises(ResourceExhausted, match="over the limit of 1000"):
            client.infer("c", torch.zeros(1001))
        assert client.infer("c", torch.ones(1000)).abs().max() == 0


def test_upload_size_limit(tight_server, tmp_path):
    big = {"w": torch.zeros(300_000)}
    with Client(tight_server.address) as client:
        client.create_model("u", "small_mlp")
        with pytest.raises(ResourceExhausted, match="--max-upload-mb"):
            client.upload("u", big)
        assert client.list_versions("u") == []
        client.upload("u", reference_module("small_mlp", False).state_dict())  # small: fine


def test_concurrent_rpc_limit(tight_server):
    release = threading.Event()
    codes = []

    def held_open_stream():
        yield rpb.UploadChunk(header=rpb.UploadHeader(model="c", sha256="0" * 64, size_bytes=1))
        release.wait(30)

    def call():
        with grpc.insecure_channel(tight_server.address) as channel:
            try:
                registry_pb2_grpc.RegistryStub(channel).UploadVersion(held_open_stream(),
                                                                      timeout=30)
            except grpc.RpcError as err:
                codes.append((err.code(), err.details()))

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
    threading.Timer(3, release.set).start()
    for t in threads:
        t.join(40)
    exhausted = [d for c, d in codes if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(exhausted) >= 3 and all(d for d in exhausted)
    with Client(tight_server.address) as client:  # and the server is fine afterwards
        assert client.infer("c", torch.tensor([1.0, 3.0])).tolist() == [-1.0, 1.0]
