"""The metrics port as Prometheus and Triton dashboards see it: Triton's nv_inference_* families
equal to what ModelStatistics reports, paramserve's own families, process and Python metrics,
``/metrics`` only (404 elsewhere), no label set made by a client's made-up model names, and the
exposition valid for prometheus_client's parser (always) and promtool (when installed)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from conftest import example_input, metrics_text, reference_module, wait_for
from paramserve.service import metrics_serve
from paramserve.service.metrics import MAX_REQUEST_SERIES, OTHER, Metrics
from paramserve.service.metrics_triton import COUNTERS, PENDING, TritonFamilies
from paramserve.service.stats import Statistics

TRITON_COUNTERS = [name for name, _, _ in COUNTERS]
# ModelStatistics field → nv_inference_* family, for the duration counters (ns → µs)
DURATIONS = {
    "success": "nv_inference_request_duration_us",
    "queue": "nv_inference_queue_duration_us",
    "compute_input": "nv_inference_compute_input_duration_us",
    "compute_infer": "nv_inference_compute_infer_duration_us",
    "compute_output": "nv_inference_compute_output_duration_us",
}
# What promtool's lint says of Triton's own names, which Triton's exposition shares and which
# dashboards query as they are: nothing else may come up.
TRITON_NAMING_LINTS = (
    'counter metrics should have "_total" suffix',
    "metric names should not contain abbreviated units",
    'non-histogram and non-summary metrics should not have "_count" suffix',
)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def per_model(family) -> dict[tuple[str, str], float]:
    return {(s.labels["model"], s.labels["version"]): s.value for s in family.samples}


def triton_infer(client, name: str, x: np.ndarray):
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(name, [inp])


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def traffic(server):
    """Two models with successes and failures, and 100 requests for names that do not exist;
    returns (model names, the made-up names)."""
    from paramserve.service.client import Client

    names = {"small_mlp": "m-" + uuid.uuid4().hex[:10], "mlp": "m-" + uuid.uuid4().hex[:10]}
    with Client(server.address, timeout_s=60) as ours:
        for arch, name in names.items():
            ours.create_model(name, arch)
            ours.upload(name, reference_module(arch, False).state_dict())
    triton = grpcclient.InferenceServerClient(server.address)
    plan = {"small_mlp": (5, 2), "mlp": (3, 1)}  # successes, failures
    for arch, (ok, bad) in plan.items():
        x = example_input(arch, False).numpy()
        for _ in range(ok):
            triton_infer(triton, names[arch], x)
        for _ in range(bad):  # resolved, then refused: one feature too many
            with pytest.raises(Exception, match="INVALID_ARGUMENT|shape|feature|size"):
                triton_infer(triton, names[arch], np.zeros((x.shape[0], x.shape[1] + 1), "f4"))
    made_up = [f"nope-{uuid.uuid4().hex}" for _ in range(100)]
    for name in made_up:
        with pytest.raises(Exception, match="NOT_FOUND|not found|no model"):
            triton_infer(triton, name, np.zeros((1, 4), "f4"))
    yield names, made_up, plan
    triton.close()


def test_nv_inference_families_equal_model_statistics(server, traffic):
    names, _, plan = traffic
    triton = grpcclient.InferenceServerClient(server.address)
    stats = triton.get_inference_statistics().model_stats
    triton.close()
    text = metrics_text(server.metrics_port)  # nothing runs between the two reads
    found = families(text)
    by_key = {(s.name, s.version): s for s in stats}
    for arch, name in names.items():
        entry = by_key[(name, "1")]
        ok, bad = plan[arch]
        assert (entry.inference_stats.success.count, entry.inference_stats.fail.count) == (ok, bad)
        key = (name, "1")
        assert per_model(found["nv_inference_request_success"])[key] == ok
        assert per_model(found["nv_inference_request_failure"])[key] == bad
        assert per_model(found["nv_inference_count"])[key] == entry.inference_count == 2 * ok
        assert per_model(found["nv_inference_exec_count"])[key] == entry.execution_count
        for field, family in DURATIONS.items():
            ns = getattr(entry.inference_stats, field).ns
            assert per_model(found[family])[key] == ns // 1000, family
        assert per_model(found[PENDING[0]])[key] == 0  # loaded, nothing in flight
        # Triton's exact text: a counter without the _total suffix, labels model and version
        assert "# TYPE nv_inference_request_success counter\n" in text
        assert f'\nnv_inference_request_success{{model="{name}",version="1"}} {ok}\n' in text
    for family in [*TRITON_COUNTERS, PENDING[0]]:
        assert {tuple(s.labels) for s in found[family].samples} == {("model", "version")}


def test_paramserve_process_and_python_families_beside_tritons(server, traffic):
    found = families(metrics_text(server.metrics_port))
    for family in ("paramserve_requests", "paramserve_request_seconds", "paramserve_bytes",
                   "paramserve_loaded_models", "process_resident_memory_bytes",
                   "process_cpu_seconds", "process_open_fds", "python_info",
                   "python_gc_collections"):
        assert family in found, family
    assert found["process_resident_memory_bytes"].samples[0].value > 10 << 20
    assert found["paramserve_loaded_models"].samples[0].value >= 2


def test_no_label_for_a_model_that_does_not_exist(server, traffic):
    """100 requests for made-up names add no label anywhere; they are counted, bounded, by
    method and status code."""
    _, made_up, _ = traffic
    text = metrics_text(server.metrics_port)
    assert not any(name in text for name in made_up)
    requests = {(s.labels["method"], s.labels["code"]): s.value
                for s in families(text)["paramserve_requests"].samples}
    assert requests[("ModelInfer", "NOT_FOUND")] >= len(made_up)


@pytest.mark.parametrize("path", ["/", "/v2/health/ready", "/v2/models/x/ready",
                                  "/metrics/extra", "/metricsx", "/favicon.ico"])
def test_only_metrics_is_served(server, path):
    status, body = get(server.metrics_port, path)
    assert status == 404, (path, body[:200])
    assert b"only /metrics" in body


def test_a_rest_client_pointed_at_the_metrics_port_is_not_told_ready(server, traffic):
    """The bug: every path answered 200, so tritonclient.http read the metrics port as a ready
    server with ready models."""
    import tritonclient.http as httpclient

    names, _, _ = traffic
    rest = httpclient.InferenceServerClient(f"127.0.0.1:{server.metrics_port}")
    try:
        assert not rest.is_server_live()
        assert not rest.is_server_ready()
        assert not rest.is_model_ready(names["mlp"])
    finally:
        rest.close()


def test_metrics_answers_get_only(server):
    status, body = get(server.metrics_port, "/metrics")
    assert status == 200 and b"nv_inference_pending_request_count" in body
    assert get(server.metrics_port, "/metrics?x=1")[0] == 200
    assert get(server.metrics_port, "/metrics", method="POST")[0] == 405


def test_prometheus_client_parser_reads_every_family(server, traffic):
    """Always runs: this is the validation when promtool is not installed."""
    text = metrics_text(server.metrics_port)
    found = families(text)
    for family in TRITON_COUNTERS:
        assert found[family].type == "counter"
    assert found[PENDING[0]].type == "gauge"
    declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert len(declared) == text.count("# TYPE ")  # each family once


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian: apt-get install prometheus); "
                    "test_prometheus_client_parser_reads_every_family validates instead")
def test_promtool_check_metrics(server, traffic):
    text = metrics_text(server.metrics_port)
    result = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode in (0, 3), result  # 1: the text does not parse
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    for line in problems:
        name, message = line.split(" ", 1)
        assert name.startswith("nv_inference_") and message in TRITON_NAMING_LINTS, line


def test_connections_are_bounded_and_idle_ones_closed(server):
    """Idle connections past the bound are closed at once instead of each holding a thread;
    those within it are closed after the socket timeout; then a scrape is answered."""
    before = _threads(server.proc.pid)
    bound = metrics_serve.MAX_CONNECTIONS
    held = [socket.create_connection(("127.0.0.1", server.metrics_port), timeout=30)
            for _ in range(bound + 8)]
    try:
        assert held[-1].recv(1) == b""  # over the bound: closed at accept
        assert _threads(server.proc.pid) - before <= bound + 2
        t0 = time.monotonic()
        assert held[0].recv(1) == b""  # idle past the timeout
        assert time.monotonic() - t0 < metrics_serve.SOCKET_TIMEOUT_S + 20
    finally:
        for conn in held:
            conn.close()
    assert wait_for(lambda: get(server.metrics_port, "/metrics")[0] == 200, timeout_s=30)


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("Threads:")).split()[1])


# ---- in-process: the renderer and the bound on request series -----------------------------


def test_label_values_are_escaped_and_parse():
    stats = Statistics()
    stats.of('odd"name\\x', 3, None).count_request(True, 0, 1000, 3000, 6000, 4, False)
    metrics = Metrics(triton=TritonFamilies(stats, lambda: [(('odd"name\\x', 3), 2)]))
    found = families(metrics.exposition().decode())
    assert per_model(found["nv_inference_count"]) == {('odd"name\\x', "3"): 4}
    assert per_model(found["nv_inference_request_duration_us"]) == {('odd"name\\x', "3"): 6}
    assert per_model(found[PENDING[0]]) == {('odd"name\\x', "3"): 2}


def test_request_series_are_bounded():
    metrics = Metrics()
    for i in range(MAX_REQUEST_SERIES + 500):
        metrics.observe_request(f"/v2/models/x{i}/infer", "OK", 0.001)
    assert len(metrics.requests) == MAX_REQUEST_SERIES + 1
    assert metrics.requests[(OTHER, "OK")] == 500
    assert len(metrics.latency) == MAX_REQUEST_SERIES + 1
