"""``serve --workers N``: N processes on one port, each answering correctly, restarted when
one dies, all stopped by one SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import time

import grpc
import pytest
import torch

from paramserve.protos import inference_pb2 as pb
from paramserve.protos import inference_pb2_grpc
from paramserve.service.client import Client
from paramserve.service.config import ServerConfig, torch_threads_for
from paramserve.service.workers import worker_config

from conftest import ServerProcess, metrics_text, reference_module

CONNECTIONS = 16


def worker_lines(server: ServerProcess) -> list[tuple[int, int, int]]:
    """(index, pid, metrics port) of every worker start the supervisor logged."""
    text = server.log_path.read_text()
    return [(int(i), int(pid), int(port)) for i, pid, port in re.findall(
        r"worker (\d+) \(pid (\d+)\) serving; metrics 127\.0\.0\.1:(\d+)", text)]


def infer_count(metrics_port: int) -> int:
    text = metrics_text(metrics_port)
    found = re.search(r'paramserve_requests_total\{code="OK",method="ModelInfer"\} (\S+)', text)
    return int(float(found.group(1))) if found else 0


def infer_over_connections(address: str, name: str, x: torch.Tensor) -> list[torch.Tensor]:
    """One request on each of CONNECTIONS separate connections (SO_REUSEPORT spreads those)."""
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.numpy().tobytes())
    outputs = []
    for i in range(CONNECTIONS):
        with grpc.insecure_channel(address, options=[("paramserve.test.connection", i)]) as ch:
            reply = inference_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request,
                                                                                timeout=60)
        outputs.append(torch.frombuffer(bytearray(reply.raw_output_contents[0]),
                                        dtype=torch.float32).reshape(tuple(reply.outputs[0].shape)))
    return outputs


@pytest.fixture
def workers(tmp_path):
    srv = ServerProcess(tmp_path / "data", "--workers", "2", "--sync-interval-s", "0.2")
    yield srv
    srv.stop()


def test_two_workers_share_the_port_and_both_serve(workers):
    module = reference_module("sequential_mlp", False)
    with Client(workers.address) as client:
        client.create_model("mlp", "sequential_mlp")
        client.upload("mlp", module.state_dict())
    x = torch.rand(3, 20)
    expected = module(x).detach()
    time.sleep(0.5)  # the other worker sees the new model at its next sync
    outputs = infer_over_connections(workers.address, "mlp", x)
    assert all(torch.allclose(y, expected, atol=1e-6) for y in outputs)
    started = worker_lines(workers)
    assert sorted(i for i, _, _ in started) == [0, 1]
    counts = [infer_count(port) for _, _, port in started]
    assert sum(counts) == CONNECTIONS
    assert all(count > 0 for count in counts), counts  # 2^-15 odds that one got them all


def test_a_dead_worker_is_restarted_and_sigterm_stops_them_all(workers):
    module = reference_module("sequential_mlp", False)
    with Client(workers.address) as client:
        client.create_model("mlp", "sequential_mlp")
        client.upload("mlp", module.state_dict())
    (_, victim, _), (_, survivor, _) = worker_lines(workers)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while len(worker_lines(workers)) < 3:
        assert time.monotonic() < deadline, workers.log_path.read_text()
        time.sleep(0.2)
    replacement = worker_lines(workers)[2][1]
    assert replacement not in (victim, survivor)
    x = torch.rand(2, 20)
    for y in infer_over_connections(workers.address, "mlp", x):
        assert torch.allclose(y, module(x).detach(), atol=1e-6)
    assert workers.stop() == 0
    for pid in (survivor, replacement):
        assert not _alive(pid), f"worker {pid} outlived the supervisor"


def test_workers_refuse_a_port_taken_by_another_server(tmp_path, workers):
    with pytest.raises(RuntimeError, match="server did not start"):
        ServerProcess(tmp_path / "other", "--workers", "2", "--listen",
                      f"127.0.0.1:{workers.port}")


def test_worker_settings_and_torch_thread_defaults():
    config = ServerConfig(listen="127.0.0.1:0", metrics_listen="127.0.0.1:9100", workers=4)
    assert worker_config(config, 2, 8001).listen == "127.0.0.1:8001"
    assert worker_config(config, 2, 8001).metrics_listen == "127.0.0.1:9102"
    assert worker_config(ServerConfig(metrics_listen="off"), 1, 8001).metrics_listen == "off"
    assert torch_threads_for(ServerConfig(), cores=2) == 1
    assert torch_threads_for(ServerConfig(), cores=16) == 15
    assert torch_threads_for(ServerConfig(workers=4), cores=16) == 3
    assert torch_threads_for(ServerConfig(workers=4), cores=2) == 1
    assert torch_threads_for(ServerConfig(torch_threads=6), cores=2) == 6


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


def test_a_crash_looping_worker_makes_the_supervisor_give_up(tmp_path):
    """Restarts back off, and a worker that keeps dying soon after it starts stops the
    server with one line instead of being restarted forever."""
    srv = ServerProcess(tmp_path / "data", "--workers", "2", "--worker-restart-limit", "2")
    try:
        victim = next(pid for index, pid, _ in worker_lines(srv) if index == 0)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len([pid for index, pid, _ in worker_lines(srv) if index == 0]) < 2:
            assert time.monotonic() < deadline, srv.log_path.read_text()
            time.sleep(0.1)
        replacement = [pid for index, pid, _ in worker_lines(srv) if index == 0][-1]
        assert "restarting it in 1 s" in srv.log_path.read_text()
        os.kill(replacement, signal.SIGKILL)
        assert srv.proc.wait(60) == 1
        log = srv.log_path.read_text()
        last = log.strip().splitlines()[-1]
        assert "worker 0" in last and "giving up" in last and "--worker-restart-limit 2" in last
        assert "Traceback" not in log
        for _, pid, _ in worker_lines(srv):
            assert not _alive(pid), f"worker {pid} outlived the supervisor"
    finally:
        srv.stop()
