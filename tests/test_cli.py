"""The ``paramserve`` CLI as a user runs it: subprocesses against a real server."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import save_file

from conftest import reference_module


def cli(server, *args, check=True):
    result = subprocess.run([sys.executable, "-m", "paramserve.service.cli", "--server",
                             server.address, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_round_trip_create_upload_infer_download(server, tmp_path):
    module = reference_module("tied_mlp", False)
    save_file({k: v.clone() for k, v in module.state_dict().items()}, tmp_path / "w.safetensors")
    assert "created model cli-tied" in cli(server, "create", "cli-tied", "--architecture",
                                           "tied_mlp").stdout
    upload = cli(server, "upload", "cli-tied", str(tmp_path / "w.safetensors"), "--alias",
                 "production")
    assert "version 1 (alias production)" in upload.stdout
    assert "upload w.safetensors" in upload.stderr  # the progress bar
    x = torch.rand(3, 4)
    np.save(tmp_path / "x.npy", x.numpy())
    cli(server, "infer", "cli-tied@production", "--input", str(tmp_path / "x.npy"), "--output",
        str(tmp_path / "y.npy"))
    assert np.allclose(np.load(tmp_path / "y.npy"), module(x).detach().numpy(), atol=1e-6)
    cli(server, "download", "cli-tied@1", "-o", str(tmp_path / "back.pt"))
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in module.state_dict().items())

    cli(server, "patch", "cli-tied", "2.weight[0, 0]", "100")
    cli(server, "init", "cli-tied@1", "normal(0, 0.01)", "--module", "0", "--seed", "3")
    cli(server, "alias", "cli-tied", "production", "2")
    versions = json.loads(cli(server, "versions", "cli-tied", "--json").stdout)
    assert [(v["number"], v["origin"], v["parent"]) for v in versions] == [
        (1, "upload", None), (2, "patch", 1), (3, "init", 1)]
    assert versions[1]["aliases"] == ["production"]
    params = json.loads(cli(server, "params", "cli-tied@production", "--json").stdout)
    tied = {p["name"]: p["tied_with"] for p in params}
    assert tied["2.weight"] == ["4.weight"]
    value = json.loads(cli(server, "params", "cli-tied@2", "4.weight[0, 0]", "--values",
                           "--json").stdout)
    assert value["values"] == 100.0
    assert "Linear(in_features=8, out_features=8" in cli(server, "tree", "cli-tied").stdout
    models = json.loads(cli(server, "models", "--json").stdout)
    assert any(m["name"] == "cli-tied" and m["aliases"] == {"production": 2} for m in models)
    archs = json.loads(cli(server, "architectures", "--json").stdout)
    assert {"name": "rgnet", "batchable": True}.items() <= next(
        a for a in archs if a["name"] == "rgnet").items()
    assert "SERVING" in cli(server, "health").stdout


def test_errors_print_one_line_and_exit_non_zero(server, tmp_path):
    result = cli(server, "versions", "no-such-model", check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "not found" in result.stderr
    result = cli(server, "upload", "x", str(tmp_path / "missing.pt"), check=False)
    assert result.returncode == 1 and "no such file" in result.stderr
    result = subprocess.run([sys.executable, "-m", "paramserve.service.cli", "--server",
                             "127.0.0.1:9", "--timeout-s", "2", "models"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and result.stderr.count("\n") == 1
    assert "UNAVAILABLE" in result.stderr


def test_delete_of_an_aliased_version_needs_force_and_says_what_it_removed(server, tmp_path):
    from paramserve.service.client import Client

    path = tmp_path / "small.safetensors"
    save_file(reference_module("small_mlp", False).state_dict(), str(path))
    cli(server, "create", "aliased", "--architecture", "small_mlp")
    cli(server, "upload", "aliased", str(path), "--alias", "production", "--quiet")
    cli(server, "alias", "aliased", "staging", "1")
    refused = cli(server, "delete", "aliased", "--version", "1", check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "production" in refused.stderr and "staging" in refused.stderr
    assert "--force" in refused.stderr
    with Client(server.address) as client:
        assert [v.number for v in client.list_versions("aliased")] == [1]
    done = cli(server, "delete", "aliased", "--version", "1", "--force")
    assert "deleted aliased version 1" in done.stdout
    assert "removed aliases: production, staging" in done.stdout
    with Client(server.address) as client:
        assert client.list_versions("aliased") == []
        assert client.get_model("aliased").aliases == {}
