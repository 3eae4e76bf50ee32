"""The KServe 0.21 SDK's clients against a real server: ``kserve.InferenceRESTClient`` (KServe
v2 REST, JSON and binary tensors) on ``--http-listen`` and ``kserve.InferenceGRPCClient`` on
the gRPC port, outputs compared with the same module run in-process.

kserve 0.21 needs protobuf >= 5 (6.x here) while the test environment keeps tritonclient 2.51's
protobuf < 5, so the SDK lives in a venv of its own and the calls run there as a script; only
numbers cross back (JSON). The venv is made once per machine under ``~/.cache`` (or
``$PARAMSERVE_KSERVE_VENV``) and reused while ``import kserve`` works in it; making it is
bounded (``VENV_TIMEOUT_S``), and a failure fails the test with pip's last lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from paramserve.service.client import Client

from conftest import ServerProcess, reference_module

KSERVE = "kserve==0.21.0"
VENV_TIMEOUT_S = 900
CALL_TIMEOUT_S = 300
TOLERANCE = 1e-6

CALLS = r"""
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

http_url, grpc_url, x_path = sys.argv[1:]
x = np.load(x_path)

def request(binary):
    tensor = InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return InferRequest(model_name="mlp", infer_inputs=[tensor], request_id="sdk")

async def main():
    report = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    report["live"] = await rest.is_server_live(http_url)
    report["ready"] = await rest.is_server_ready(http_url)
    report["model_ready"] = await rest.is_model_ready(http_url, "mlp")
    report["missing_ready"] = await rest.is_model_ready(http_url, "no-such-model")
    for binary in (False, True):
        reply = await rest.infer(http_url, request(binary), model_name="mlp")
        report[f"rest_binary_{binary}"] = {"id": reply.id,
                                           "y": reply.outputs[0].as_numpy().tolist(),
                                           "shape": reply.outputs[0].shape}
    try:
        await rest.infer(http_url, request(False), model_name="no-such-model")
        report["rest_missing"] = "answered"
    except Exception as err:
        report["rest_missing"] = [err.response.status_code, str(err)]
    await rest.close()
    grpc_client = InferenceGRPCClient(grpc_url, timeout=60)
    report["grpc_live"] = await grpc_client.is_server_live()
    report["grpc_model_ready"] = await grpc_client.is_model_ready("mlp")
    reply = await grpc_client.infer(request(True))
    report["grpc"] = {"y": reply.outputs[0].as_numpy().tolist(), "shape": reply.outputs[0].shape}
    await grpc_client.close()
    print(json.dumps(report))

asyncio.run(main())
"""


def kserve_venv() -> Path:
    """The venv's python, made (bounded) when missing or broken."""
    default = Path.home() / ".cache" / "paramserve-tests" / (
        f"{KSERVE.replace('==', '-')}-py{sys.version_info.major}{sys.version_info.minor}")
    venv = Path(os.environ.get("PARAMSERVE_KSERVE_VENV", default))
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import kserve"]
    if python.exists() and subprocess.run(probe, capture_output=True, timeout=120).returncode == 0:
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", KSERVE],
                             capture_output=True, text=True, timeout=VENV_TIMEOUT_S)
    if install.returncode != 0 or subprocess.run(probe, timeout=120).returncode != 0:
        pytest.fail(f"cannot make the {KSERVE} venv at {venv}:\n{install.stderr[-3000:]}")
    return python


@pytest.fixture(scope="module")
def sdk_python():
    return kserve_venv()


def test_kserve_rest_and_grpc_clients(tmp_path, sdk_python):
    srv = ServerProcess(tmp_path / "data")
    try:
        module = reference_module("sequential_mlp", False, seed=11)
        with Client(srv.address) as client:
            client.create_model("mlp", "sequential_mlp")
            client.upload("mlp", module.state_dict())
        x = np.random.default_rng(4).random((3, 20), dtype=np.float32)
        np.save(tmp_path / "x.npy", x)
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        run = subprocess.run(
            [str(sdk_python), "-c", CALLS, f"http://127.0.0.1:{srv.http_port}", srv.address,
             str(tmp_path / "x.npy")],
            capture_output=True, text=True, timeout=CALL_TIMEOUT_S,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert run.returncode == 0, run.stderr[-3000:]
        report = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        srv.stop()
    assert report["live"] and report["ready"] and report["model_ready"]
    assert not report["missing_ready"]
    for key in ("rest_binary_False", "rest_binary_True", "grpc"):
        y = np.array(report[key]["y"], np.float32)
        assert list(report[key]["shape"]) == [3, 10], key
        assert np.abs(y.reshape(3, 10) - expected).max() <= TOLERANCE, key
    assert report["rest_binary_False"]["id"] == "sdk"
    status, message = report["rest_missing"]
    assert status == 404 and "no-such-model" in message
    assert report["grpc_live"] and report["grpc_model_ready"]
