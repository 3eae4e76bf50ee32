"""KServe v2 HTTP/REST on ``--http-listen``: tritonclient.http (JSON and binary tensors,
metadata, config, readiness, repository, statistics, shared memory) and plain HTTP requests
(error statuses and bounds) against a real server, outputs compared with the same module run
in-process."""

from __future__ import annotations

import gzip
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from paramserve.protos import inference_pb2 as pb
from paramserve.protos import inference_pb2_grpc
from paramserve.service.client import Client

from conftest import ServerProcess, metrics_text, reference_module

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def models(server):
    """An FP32 MLP (uploaded parameters) and Triton's two-input ``simple``, created once."""
    module = reference_module("sequential_mlp", False, seed=3)
    with Client(server.address) as client:
        client.create_model("http-mlp", "sequential_mlp")
        client.upload("http-mlp", module.state_dict())
        client.create_model("http-simple", "simple")
    return {"mlp": module}


@pytest.fixture
def triton(server, models):
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    yield client
    client.close()


def call(port: int, method: str, path: str, body: bytes | None = None, headers=None):
    """A plain HTTP request: (status, headers, body) whatever the status."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def post_json(port: int, path: str, doc, headers=None):
    status, _, body = call(port, "POST", path, json.dumps(doc).encode(),
                           {"Content-Type": "application/json", **(headers or {})})
    return status, json.loads(body) if body else None


def infer_input(x: np.ndarray, name: str = "input", binary: bool = True):
    tensor = httpclient.InferInput(name, list(x.shape), "FP32" if x.dtype == np.float32
                                   else "INT32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


# ---- tritonclient.http ----------------------------------------------------------------------

def test_health_and_server_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "paramserve"
    assert {"model_repository", "statistics", "binary_tensor_data"} <= set(meta["extensions"])


@pytest.mark.parametrize("binary_in,binary_out", [(False, False), (True, True), (True, False),
                                                  (False, True)])
def test_infer_json_and_binary_tensors_match_in_process(triton, models, binary_in, binary_out):
    x = torch.rand(5, 20, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = models["mlp"](x).numpy()
    outputs = [httpclient.InferRequestedOutput("output", binary_data=binary_out)]
    result = triton.infer("http-mlp", [infer_input(x.numpy(), binary=binary_in)],
                          outputs=outputs, request_id="r-1")
    y = result.as_numpy("output")
    assert y.shape == (5, 10) and y.dtype == np.float32
    assert np.abs(y - expected).max() <= TOLERANCE
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_version"] == "1"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary_out


def test_infer_without_requested_outputs_answers_binary(triton, models):
    """tritonclient asks for everything in binary (binary_data_output) when it names none."""
    x = np.random.default_rng(1).random((2, 20), dtype=np.float32)
    result = triton.infer("http-mlp", [infer_input(x)])
    with torch.no_grad():
        expected = models["mlp"](torch.from_numpy(x)).numpy()
    assert np.abs(result.as_numpy("output") - expected).max() <= TOLERANCE
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4


def test_two_inputs_two_outputs_mixed_binary_and_json(triton):
    input0 = np.tile(np.arange(16, dtype=np.int32), (3, 1))
    input1 = np.full((3, 16), 7, dtype=np.int32)
    inputs = [infer_input(input0, "INPUT0", binary=True), infer_input(input1, "INPUT1",
                                                                       binary=False)]
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=False),
               httpclient.InferRequestedOutput("OUTPUT1", binary_data=True)]
    result = triton.infer("http-simple", inputs, outputs=outputs)
    assert np.array_equal(result.as_numpy("OUTPUT0"), input0 + input1)
    assert np.array_equal(result.as_numpy("OUTPUT1"), input0 - input1)
    assert result.as_numpy("OUTPUT0").dtype == np.int32


def test_classification_answers_bytes_in_json_and_binary(triton, models):
    """class_count (Triton's classification extension): BYTES "score:index" strings, parsed
    by tritonclient from JSON and from binary alike."""
    x = np.random.default_rng(3).random((2, 20), dtype=np.float32)
    with torch.no_grad():
        y = models["mlp"](torch.from_numpy(x)).numpy()
    for binary in (False, True):
        out = httpclient.InferRequestedOutput("output", binary_data=binary, class_count=3)
        top = triton.infer("http-mlp", [infer_input(x)], outputs=[out]).as_numpy("output")
        assert top.shape == (2, 3)
        for row, expected in zip(top, y):
            text = [item.decode() if binary else item for item in row]  # JSON: str, as Triton's
            assert [int(item.split(":")[1]) for item in text] == list(np.argsort(-expected)[:3])


def test_compressed_requests_and_responses(triton, models):
    x = np.random.default_rng(8).random((4, 20), dtype=np.float32)
    with torch.no_grad():
        expected = models["mlp"](torch.from_numpy(x)).numpy()
    for algorithm in ("gzip", "deflate"):
        result = triton.infer("http-mlp", [infer_input(x, binary=False)],
                              request_compression_algorithm=algorithm,
                              response_compression_algorithm=algorithm)
        assert np.abs(result.as_numpy("output") - expected).max() <= TOLERANCE


def test_async_infer_many_in_flight(triton, models):
    xs = [np.random.default_rng(i).random((1 + i % 3, 20), dtype=np.float32) for i in range(12)]
    client = httpclient.InferenceServerClient(url=triton._parsed_url.netloc, concurrency=6)
    try:
        pending = [client.async_infer("http-mlp", [infer_input(x)]) for x in xs]
        results = [p.get_result(timeout=60).as_numpy("output") for p in pending]
    finally:
        client.close()
    for x, y in zip(xs, results):
        with torch.no_grad():
            assert np.abs(y - models["mlp"](torch.from_numpy(x)).numpy()).max() <= TOLERANCE


def test_model_metadata_config_ready_and_versions(triton):
    meta = triton.get_model_metadata("http-mlp")
    assert meta["name"] == "http-mlp" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 20]}]
    assert meta["outputs"][0]["shape"] == [-1, 10]
    assert triton.get_model_metadata("http-mlp", "1")["name"] == "http-mlp"
    config = triton.get_model_config("http-mlp")
    assert config["name"] == "http-mlp" and config["max_batch_size"] > 0
    assert config["input"][0]["data_type"] == "TYPE_FP32" and config["input"][0]["dims"] == [20]
    assert triton.is_model_ready("http-mlp") and triton.is_model_ready("http-mlp", "1")
    assert not triton.is_model_ready("http-no-such-model")
    assert not triton.is_model_ready("http-mlp", "99")
    with pytest.raises(InferenceServerException, match="404|not found|no model"):
        triton.get_model_metadata("http-no-such-model")


def test_statistics_count_http_inferences(triton):
    before = triton.get_inference_statistics("http-mlp")["model_stats"][0]["inference_count"]
    triton.infer("http-mlp", [infer_input(np.ones((4, 20), np.float32))])
    stats = triton.get_inference_statistics("http-mlp", "1")["model_stats"]
    assert stats[0]["name"] == "http-mlp" and stats[0]["version"] == "1"
    assert stats[0]["inference_count"] >= before + 4
    assert stats[0]["inference_stats"]["success"]["count"] >= 1
    everything = triton.get_inference_statistics()["model_stats"]
    assert "http-mlp" in {s["name"] for s in everything}


def test_repository_index_load_unload(triton):
    index = {m["name"]: m for m in triton.get_model_repository_index()}
    assert index["http-mlp"]["state"] == "READY"
    triton.unload_model("http-mlp")
    triton.load_model("http-mlp")
    assert triton.is_model_ready("http-mlp")
    with pytest.raises(InferenceServerException, match="404|not found|no model"):
        triton.load_model("http-no-such-model")


def test_repository_load_unload_under_explicit_control(tmp_path):
    srv = ServerProcess(tmp_path / "data", "--model-control-mode", "explicit")
    try:
        with Client(srv.address) as client:
            client.create_model("m", "simple")
        triton = httpclient.InferenceServerClient(url=f"127.0.0.1:{srv.http_port}")
        assert not triton.is_model_ready("m")
        triton.load_model("m")
        assert triton.is_model_ready("m")
        assert [m["state"] for m in triton.get_model_repository_index()] == ["READY"]
        triton.unload_model("m")
        assert not triton.is_model_ready("m")
        status, body = post_json(srv.http_port, "/v2/repository/index", {"ready": True})
        assert status == 200 and body == []
        triton.close()
    finally:
        srv.stop()


def test_system_shared_memory_over_rest(triton, models):
    """Register, infer with the input read from and the output written to the region, status,
    unregister: tritonclient.http's calls (the region made with the standard library:
    tritonclient's own shm helper needs pkg_resources)."""
    from multiprocessing import shared_memory

    x = np.random.default_rng(5).random((3, 20), dtype=np.float32)
    region = shared_memory.SharedMemory(f"paramserve-http-{time.monotonic_ns()}", create=True,
                                        size=4096)
    try:
        region.buf[: x.nbytes] = x.tobytes()
        triton.register_system_shared_memory("in-out", "/" + region.name, 4096)
        status = triton.get_system_shared_memory_status()
        assert [r["name"] for r in status] == ["in-out"] and status[0]["byte_size"] == 4096
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_shared_memory("in-out", x.nbytes)
        out = httpclient.InferRequestedOutput("output", binary_data=True)
        out.set_shared_memory("in-out", 3 * 10 * 4, offset=2048)
        result = triton.infer("http-mlp", [tensor], outputs=[out])
        assert "binary_data_size" not in result.get_output("output").get("parameters", {})
        y = np.frombuffer(bytes(region.buf[2048 : 2048 + 120]), np.float32).reshape(3, 10)
        with torch.no_grad():
            assert np.abs(y - models["mlp"](torch.from_numpy(x)).numpy()).max() <= TOLERANCE
        triton.unregister_system_shared_memory("in-out")
        assert triton.get_system_shared_memory_status() == []
    finally:
        region.close()
        region.unlink()


# ---- plain HTTP: statuses, bodies, bounds ---------------------------------------------------

def test_nested_json_data_and_parameters(server, models):
    x = np.random.default_rng(2).random((2, 20)).astype(np.float32)
    doc = {"id": "nested", "parameters": {"custom": 3, "flag": True},
           "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 20],
                       "data": x.tolist()}]}
    status, body = post_json(server.http_port, "/v2/models/http-mlp/versions/1/infer", doc)
    assert status == 200, body
    assert body["model_name"] == "http-mlp" and body["id"] == "nested"
    out = body["outputs"][0]
    assert out["name"] == "output" and out["datatype"] == "FP32" and out["shape"] == [2, 10]
    with torch.no_grad():
        expected = models["mlp"](torch.from_numpy(x)).numpy().reshape(-1)
    assert np.abs(np.array(out["data"], np.float32) - expected).max() <= TOLERANCE


def error_of(status_body) -> tuple[int, str]:
    status, body = status_body
    assert set(body) == {"error"}, body
    return status, body["error"]


def infer_doc(datatype="FP32", shape=(1, 20), data=None, name="input"):
    data = data if data is not None else [0.5] * int(np.prod(shape))
    return {"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": data}]}


@pytest.mark.parametrize("doc,status,words", [
    (infer_doc(datatype="FP99"), 400, "FP99"),
    (infer_doc(datatype="INT32", data=[1] * 20), 400, "FP32"),
    (infer_doc(shape=(1, 21)), 400, "shape"),
    (infer_doc(data=[0.5] * 19), 400, "needs 20 values"),
    (infer_doc(data=["a"] * 20), 400, "FP32 values"),
    (infer_doc(data=[[0.5] * 10, [0.5] * 11]), 400, "nested evenly"),
    (infer_doc(name="nope"), 400, "no input 'nope'"),
    ({"inputs": []}, 400, "inputs"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, -3], "data": []}]}, 400,
     "shape"),
    ([1, 2, 3], 400, "JSON object"),
])
def test_bad_infer_requests_are_400_with_a_message(server, models, doc, status, words):
    got, message = error_of(post_json(server.http_port, "/v2/models/http-mlp/infer", doc))
    assert got == status and words in message, message


def test_unknown_model_path_and_method(server, models):
    assert error_of(post_json(server.http_port, "/v2/models/nope/infer", infer_doc()))[0] == 404
    status, _, body = call(server.http_port, "GET", "/v2/models/nope")
    assert status == 404 and "nope" in json.loads(body)["error"]
    status, headers, body = call(server.http_port, "GET", "/v3/anything")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert "no such endpoint" in json.loads(body)["error"]
    status, _, body = call(server.http_port, "GET", "/v2/models/http-mlp/infer")
    assert status == 405 and "error" in json.loads(body)


def test_header_size_and_count_are_bounded(server, models):
    for headers in ({"X-Big": "a" * 9000}, {f"X-{i}": "1" for i in range(200)}):
        status, _, _ = call(server.http_port, "GET", "/v2/health/live", headers=headers)
        assert 400 <= status < 500, status
    assert call(server.http_port, "GET", "/v2/health/live")[0] == 200
    status, _, body = call(server.http_port, "POST", "/v2/models/http-mlp/infer",
                           b"\x1f\x8b not gzip", {"Content-Encoding": "gzip"})
    assert status == 400 and "error" in json.loads(body)


def test_binary_header_length_and_sizes_are_checked(server, models):
    x = np.ones((1, 20), np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 20],
                                     "parameters": {"binary_data_size": len(x)}}]}).encode()
    path = "/v2/models/http-mlp/infer"
    for length, extra, words in [(len(header) + 5000, b"", "Inference-Header-Content-Length"),
                                 ("abc", b"", "Inference-Header-Content-Length"),
                                 (len(header), b"junk", "4 bytes after the tensors"),
                                 (len(header), None, "runs past the body's end")]:
        body = header + (x[:-8] if extra is None else x + extra)
        status, _, reply = call(server.http_port, "POST", path, body,
                                {"Inference-Header-Content-Length": str(length)})
        assert status == 400 and words in json.loads(reply)["error"], reply
    status, headers, reply = call(server.http_port, "POST", path, header + x,
                                  {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200 and "Inference-Header-Content-Length" not in headers  # JSON asked


def test_deep_json_is_refused_before_parsing(server, models):
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, _, body = call(server.http_port, "POST", "/v2/models/http-mlp/infer", deep)
    assert status == 400 and "nested" in json.loads(body)["error"]
    status, _, body = call(server.http_port, "POST", "/v2/repository/index", deep)
    assert status == 400 and "nested" in json.loads(body)["error"]


def test_body_over_the_limit_is_413(tmp_path):
    srv = ServerProcess(tmp_path / "data", "--http-max-body-mb", "1")
    try:
        with Client(srv.address) as client:
            client.create_model("m", "sequential_mlp")
            client.upload("m", reference_module("sequential_mlp", False).state_dict())
        big = np.zeros((14_000, 20), np.float32)  # 1.07 MiB of binary tensor
        triton = httpclient.InferenceServerClient(url=f"127.0.0.1:{srv.http_port}")
        with pytest.raises(InferenceServerException, match="--http-max-body-mb") as caught:
            triton.infer("m", [infer_input(big)])
        assert caught.value.status() == "413"
        triton.close()
        triton = httpclient.InferenceServerClient(url=f"127.0.0.1:{srv.http_port}")
        assert triton.infer("m", [infer_input(big[:100])]).as_numpy("output").shape == (100, 10)
        triton.close()
        bomb = gzip.compress(b'{"inputs": []' + b" " * (3 << 20) + b"}")  # 3 MiB in 3 kB
        status, _, body = call(srv.http_port, "POST", "/v2/models/m/infer", bomb,
                               {"Content-Encoding": "gzip"})
        assert len(bomb) < 10_000 and status == 413, body
        assert "--http-max-body-mb" in json.loads(body)["error"]
    finally:
        srv.stop()


def test_json_tensors_past_the_json_limit_are_413_and_binary_ones_pass(tmp_path):
    """JSON numbers cost ~10x their text while parsed: the JSON part has its own, smaller
    bound (--http-max-json-mb), checked before parsing; the same tensor as binary data passes."""
    srv = ServerProcess(tmp_path / "data", "--http-max-json-mb", "1")
    try:
        with Client(srv.address) as client:
            client.create_model("m", "sequential_mlp")
            client.upload("m", reference_module("sequential_mlp", False).state_dict())
        x = np.full((3_000, 20), 0.123456, np.float32)  # ~0.5 MB binary, > 1 MiB as JSON
        status, body = post_json(srv.http_port, "/v2/models/m/infer",
                                 infer_doc(shape=x.shape, data=x.ravel().tolist()))
        assert status == 413 and "--http-max-json-mb" in body["error"], body
        triton = httpclient.InferenceServerClient(url=f"127.0.0.1:{srv.http_port}")
        try:
            assert triton.infer("m", [infer_input(x)]).as_numpy("output").shape == (3_000, 10)
        finally:
            triton.close()
    finally:
        srv.stop()


def test_http_off_and_a_taken_port(tmp_path, server):
    srv = ServerProcess(tmp_path / "off", "--http-listen", "off")
    try:
        assert srv.http_port is None
        with grpc.insecure_channel(srv.address) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            meta = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30)
        assert "binary_tensor_data" not in meta.extensions and "statistics" in meta.extensions
    finally:
        srv.stop()
    with pytest.raises(RuntimeError, match="cannot serve HTTP on 127.0.0.1:.*--http-listen"):
        ServerProcess(tmp_path / "taken", "--http-listen", f"127.0.0.1:{server.http_port}")


def test_workers_share_the_http_port(tmp_path):
    srv = ServerProcess(tmp_path / "data", "--workers", "2", "--sync-interval-s", "0.2")
    try:
        module = reference_module("sequential_mlp", False)
        with Client(srv.address) as client:
            client.create_model("m", "sequential_mlp")
            client.upload("m", module.state_dict())
        time.sleep(0.5)  # the other worker sees the model at its next sync
        x = np.random.default_rng(9).random((2, 20)).astype(np.float32)
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy().reshape(-1)
        for _ in range(8):  # urllib: a new connection each, spread over the workers
            status, body = post_json(srv.http_port, "/v2/models/m/infer",
                                     infer_doc(shape=(2, 20), data=x.tolist()))
            assert status == 200, body
            assert np.abs(np.array(body["outputs"][0]["data"]) - expected).max() <= TOLERANCE
    finally:
        assert srv.stop() == 0


def test_http_requests_are_counted_in_the_metrics(server, triton):
    triton.infer("http-mlp", [infer_input(np.ones((1, 20), np.float32))])
    call(server.http_port, "GET", "/v2/models/nope")
    from prometheus_client.parser import text_string_to_metric_families

    counted = {(s.labels["method"], s.labels["code"]): s.value
               for family in text_string_to_metric_families(metrics_text(server.metrics_port))
               for s in family.samples if s.name == "paramserve_requests_total"}
    assert counted[("HTTP POST infer", "OK")] >= 1
    assert counted[("HTTP GET model metadata", "NOT_FOUND")] >= 1


# ---- the limits gRPC has: concurrency, a silent client, tokens ------------------------------

def test_concurrency_is_shared_with_grpc_and_a_slow_body_times_out(tmp_path):
    srv = ServerProcess(tmp_path / "data", "--max-concurrent-rpcs", "1",
                        "--stream-idle-timeout-s", "3")
    try:
        slow = socket.create_connection(("127.0.0.1", srv.http_port), timeout=30)
        slow.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 1000\r\n\r\n{")  # then nothing: the request holds a slot
        time.sleep(0.5)
        status, body = post_json(srv.http_port, "/v2/repository/index", {})
        assert status == 429 and "--max-concurrent-rpcs 1" in body["error"]
        with grpc.insecure_channel(srv.address) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert call(srv.http_port, "GET", "/v2/health/ready")[0] == 200  # probes always
        reply = slow.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and b"--stream-idle-timeout-s" in reply
        slow.close()
        assert post_json(srv.http_port, "/v2/repository/index", {}) == (200, [])
    finally:
        srv.stop()


def test_bearer_tokens_follow_the_grpc_rules(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("full-secret\nread-secret read\n")
    srv = ServerProcess(tmp_path / "data", "--auth-token-file", str(tokens))
    try:
        port = srv.http_port
        status, headers, body = call(port, "GET", "/v2/models/m")
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert "Authorization: Bearer" in json.loads(body)["error"]
        read = {"Authorization": "Bearer read-secret"}
        full = {"Authorization": "Bearer full-secret"}
        assert call(port, "GET", "/v2", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(port, "GET", "/v2", headers=read)[0] == 200
        assert post_json(port, "/v2/repository/index", {}, read) == (200, [])
        status, body = post_json(port, "/v2/repository/models/m/load", {}, read)
        assert status == 403 and "read-only" in body["error"]
        status, body = post_json(port, "/v2/repository/models/m/load", {}, full)
        assert status == 404  # past auth: no such model
        triton = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        assert triton.get_server_metadata(headers=read)["name"] == "paramserve"
        triton.close()
    finally:
        srv.stop()
    srv = ServerProcess(tmp_path / "open", "--auth-token-file", str(tokens), "--auth-open-reads")
    try:
        assert post_json(srv.http_port, "/v2/repository/index", {}) == (200, [])
        status, body = post_json(srv.http_port, "/v2/repository/models/m/load", {})
        assert status == 401, body  # writes still need a full token
    finally:
        srv.stop()


def test_sigterm_lets_an_http_request_in_flight_finish(tmp_path):
    """The request waits 2 s in the batcher (--max-queue-delay-us) when SIGTERM comes: it is
    answered, then the server exits 0. (A request whose body is still arriving is not: aiohttp
    stops reading connections at shutdown.)"""
    srv = ServerProcess(tmp_path / "data", "--grace-s", "20", "--max-queue-delay-us", "2000000",
                        "--http-keepalive-timeout-s", "1")
    try:
        for first in (b"", b"GET /v2 HTTP/1.1\r\nHost: x\r\n"):  # silent; headers half sent
            idle = socket.create_connection(("127.0.0.1", srv.http_port), timeout=30)
            idle.sendall(first)
            started = time.monotonic()
            assert idle.recv(100) == b"" and time.monotonic() - started < 10  # closed on us
            idle.close()
        with Client(srv.address) as client:
            client.create_model("m", "sequential_mlp")
            client.upload("m", reference_module("sequential_mlp", False).state_dict())
        assert post_json(srv.http_port, "/v2/models/m/infer", infer_doc())[0] == 200  # loaded
        replies = []
        sender = threading.Thread(target=lambda: replies.append(
            post_json(srv.http_port, "/v2/models/m/infer", infer_doc())))
        started = time.monotonic()
        sender.start()
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        sender.join(60)
        status, body = replies[0]
        assert status == 200 and body["outputs"][0]["shape"] == [1, 10], body
        assert time.monotonic() - started >= 1.5  # it was in flight, not answered before
        assert srv.stop() == 0
    finally:
        srv.stop()


# ---- the codec and the status table, in-process -----------------------------------------------

def test_every_core_error_class_has_an_http_status():
    """Each class the core raises has a status of its own; only DataLoss is a 500."""
    from paramserve.service.http_routes import HTTP_STATUS
    from paramserve.service.status import CORE_STATUS

    status = {cls.__name__: HTTP_STATUS.get(code, 500) for cls, code in CORE_STATUS.items()}
    assert [name for name, code in status.items() if code == 500] == ["DataLoss"]
    assert {k: status[k] for k in ("NotFound", "InvalidArgument", "FailedPrecondition",
                                   "ResourceExhausted", "DeadlineExceeded")} == {
        "NotFound": 404, "InvalidArgument": 400, "FailedPrecondition": 400,
        "ResourceExhausted": 429, "DeadlineExceeded": 504}


@pytest.mark.parametrize("datatype,values,dtype", [
    ("INT64", [[-(2**62), 3], [4, 2**62]], np.int64), ("UINT8", [0, 255, 7, 1], np.uint8),
    ("BOOL", [True, False, True, True], np.bool_), ("FP16", [0.5, -2.0, 65504.0, 0.0],
                                                     np.float16),
    ("FP64", [0.1, 1e300, -3.0, 2], np.float64)])
def test_json_tensors_become_the_bytes_grpc_sends(datatype, values, dtype):
    from paramserve.registry.limits import DEFAULT_LIMITS
    from paramserve.service import http_codec

    doc = {"inputs": [{"name": "x", "datatype": datatype, "shape": [2, 2], "data": values}]}
    request, _, _ = http_codec.infer_request(json.dumps(doc).encode(), None, "m", "",
                                             DEFAULT_LIMITS)
    assert request.raw_input_contents[0] == np.array(values, dtype).tobytes()
    if datatype == "UINT8":
        doc["inputs"][0]["data"] = [0, 256, 1, 1]
        with pytest.raises(Exception, match="out of range for UINT8"):
            http_codec.infer_request(json.dumps(doc).encode(), None, "m", "", DEFAULT_LIMITS)


def test_bf16_rounds_to_nearest_even_and_answers_as_float():
    from paramserve.registry.limits import DEFAULT_LIMITS
    from paramserve.service import http_codec

    values = [1.0, 1.00390625, 1.01171875, -3.5]  # halfway cases round to even
    doc = {"inputs": [{"name": "x", "datatype": "BF16", "shape": [4], "data": values}]}
    request, _, _ = http_codec.infer_request(json.dumps(doc).encode(), None, "m", "",
                                             DEFAULT_LIMITS)
    sent = torch.tensor(values, dtype=torch.bfloat16)
    assert request.raw_input_contents[0] == sent.view(torch.int16).numpy().tobytes()
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="y", datatype="BF16", shape=[4])
    response.raw_output_contents.append(request.raw_input_contents[0])
    body, header_length = http_codec.infer_response(response, False, {})
    assert header_length is None
    assert json.loads(body)["outputs"][0]["data"] == sent.float().tolist()
