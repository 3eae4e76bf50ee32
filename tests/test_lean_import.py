"""The client needs numpy and grpc, not torch: importing it leaves torch (and numpy) out of the
process, and a round trip (upload .safetensors and .pt, models, infer, arrays, downloads,
tensor, patch) works in a process where importing torch fails."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from conftest import reference_module

from paramserve.registry.tensorfile import write_tensors

# Any attempt to import torch is recorded and fails, so a guarded ``try: import torch`` is
# caught too, not only one that would have crashed.
BLOCK_TORCH = """
import sys

class BlockTorch:
    attempts = []

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            self.attempts.append(name)
            raise ImportError(f"torch is blocked in this test ({name})")
        return None

blocker = BlockTorch()
sys.meta_path.insert(0, blocker)
"""

ROUND_TRIP = (
    BLOCK_TORCH
    + """
import json
import numpy as np
from paramserve.service.client import Client

address, model, safetensors_path, pt_path, out_dir = sys.argv[1:]
with Client(address, timeout_s=60) as client:
    client.create_model(model, "small_mlp")
    first = client.upload(model, safetensors_path)
    second = client.upload(model, pt_path, alias="production")
    models = [m.name for m in client.list_models()]
    y = client.infer(model, np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
                     ref="production")
    arrays = client.arrays(model, "production")
    client.download(model, 1, out_dir + "/v1.safetensors")
    client.download(model, 2, out_dir + "/v2.npz")
    bias = client.tensor(model, "0.bias")
    patched = client.patch(model, "2.bias", np.array([0.25], np.float32))
    attempts_before_state_dict = list(blocker.attempts)
    try:
        client.state_dict(model)
        state_dict = "returned"
    except ImportError:
        state_dict = "needs torch"
print(json.dumps({
    "torch_imported": "torch" in sys.modules, "attempts": attempts_before_state_dict,
    "shas": [first.sha256, second.sha256], "models": models, "y": y.tolist(),
    "y_type": type(y).__name__, "arrays": {k: v.tolist() for k, v in arrays.items()},
    "bias": bias.tolist(), "patched": patched.number, "state_dict": state_dict}))
"""
)


def run_python(code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_client_leaves_torch_and_numpy_out():
    """numpy comes with the first call that moves tensors: listing models never loads it."""
    out = run_python(
        "import sys\nimport paramserve.service.client\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'numpy')))"
    )
    assert out.strip() == "[]"


def test_a_round_trip_works_where_torch_cannot_be_imported(server, model_name, tmp_path):
    module = reference_module("small_mlp", False)
    state = module.state_dict()
    with open(tmp_path / "w.safetensors", "wb") as f:
        write_tensors(f, list(state.items()))
    torch.save(state, tmp_path / "w.pt")
    out = run_python(
        ROUND_TRIP,
        server.address,
        model_name,
        str(tmp_path / "w.safetensors"),
        str(tmp_path / "w.pt"),
        str(tmp_path),
    )
    result = json.loads(out)
    assert not result["torch_imported"] and result["attempts"] == []
    assert result["shas"][0] == result["shas"][1]  # the .pt became the same canonical blob
    assert model_name in result["models"] and result["y_type"] == "ndarray"
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    assert np.abs(np.array(result["y"]) - module(x).detach().numpy()).max() <= 1e-5
    assert all(np.array_equal(result["arrays"][k], v.numpy()) for k, v in state.items())
    assert result["bias"] == state["0.bias"].tolist() and result["patched"] == 3
    assert result["state_dict"] == "needs torch"
    assert (tmp_path / "v1.safetensors").read_bytes() == (tmp_path / "w.safetensors").read_bytes()
    with np.load(tmp_path / "v2.npz") as saved:
        assert all(np.array_equal(saved[k], v.numpy()) for k, v in state.items())


CLI = (
    BLOCK_TORCH
    + """
import runpy
runpy.run_module("paramserve.service.cli", run_name="__main__", alter_sys=True)
"""
)


def test_cli_client_commands_and_their_errors_need_no_torch(server, model_name, tmp_path):
    """Every command below fails on its first torch import; an error's exit code is found
    without one too (service.errors imports torch; status.code_of does not)."""
    module = reference_module("small_mlp", False)
    torch.save(module.state_dict(), tmp_path / "w.pt")
    torch.save(module, tmp_path / "model.pt")  # the model itself: refused before it is sent
    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", CLI, "--server", server.address, *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )

    for args in (
        ["create", model_name, "--architecture", "small_mlp"],
        ["upload", model_name, "w.pt"],
        ["models"],
        ["infer", model_name, "--input", "x.npy"],
        ["download", model_name, "-o", "v1.npz"],
        ["params", model_name, "0.bias", "--values"],
    ):
        done = cli(*args)
        assert done.returncode == 0, (args, done.stderr)
    refused = cli("upload", model_name, "model.pt")
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.startswith("paramserve: error: model.pt pickles 'torch.nn.modules")
    assert len(refused.stderr.strip().splitlines()) == 1
    missing = cli("versions", "no-such-model")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing.stderr
