"""The builders' guide, reproduced through a real server: what a user does in-process
(``net.load_state_dict(...)``, ``net[2].state_dict()``, ``net[2].apply(init_...)``, the guide's
own FixedHiddenMLP) gives the same tensors through paramserve's client and CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import reference_module
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from paramserve.registry import get_architecture


def cli(server, *args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "paramserve.service.cli", "--server", server.address, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def load_download(path):
    """A downloaded file read back as the user would, by its format's own library."""
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            return {k: torch.from_numpy(arrays[k]) for k in arrays.files}
    return torch.load(path, weights_only=True)


# ---- downloads hold every state_dict key ----------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt"])
def test_a_tied_download_loads_strict_into_the_in_process_module(
    server, client, model_name, tmp_path, suffix
):
    module = reference_module("tied_mlp", False)
    client.create_model(model_name, "tied_mlp")
    stored = client.upload(model_name, module.state_dict())
    path = tmp_path / f"w{suffix}"
    cli(server, "download", f"{model_name}@1", "-o", str(path))

    state = load_download(path)
    assert set(state) == set(module.state_dict())  # tied names 4.weight, 4.bias included
    net = get_architecture("tied_mlp").build(seed=99)  # other values, same tied structure
    net.load_state_dict(state, strict=True)
    assert net[2].weight is net[4].weight  # loading kept the tie
    x = torch.rand(5, 4)
    assert torch.equal(net(x), module(x))
    if suffix != ".npz":  # an upload format: it goes back up as the same version's bytes
        assert client.upload(model_name, str(path)).sha256 == stored.sha256


def test_a_download_without_ties_is_the_stored_blob_byte_for_byte(
    server, client, model_name, tmp_path
):
    import hashlib

    client.create_model(model_name, "small_mlp")
    stored = client.upload(model_name, reference_module("small_mlp", False).state_dict())
    path = tmp_path / "w.safetensors"
    cli(server, "download", model_name, "-o", str(path))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == stored.sha256


# ---- a parameter query on a submodule path --------------------------------------------------


def test_params_of_a_submodule_are_its_state_dict(server, client, model_name):
    net = reference_module("small_mlp", False)
    client.create_model(model_name, "small_mlp")
    client.upload(model_name, net.state_dict())

    listed = json.loads(cli(server, "params", model_name, "2", "--json").stdout)
    assert [(p["name"], p["spec"]["shape"]) for p in listed] == [
        (k, list(v.shape)) for k, v in net[2].state_dict().items()
    ]  # weight, bias
    values = json.loads(cli(server, "params", model_name, "2", "--values", "--json").stdout)
    assert [v["name"] for v in values] == list(net[2].state_dict())
    for entry, (key, tensor) in zip(values, net[2].state_dict().items()):
        assert torch.equal(torch.tensor(entry["values"], dtype=tensor.dtype), tensor), key
    text = cli(server, "params", model_name, "2").stdout
    assert "weight" in text and "bias" in text and "0.weight" not in text

    # the client answers the same question; an exact tensor name keeps its full key
    infos = client.parameters(model_name, path="2")
    assert [p.name for p in infos] == ["weight", "bias"]
    assert [p.name for p in client.parameters(model_name, path="2.bias")] == ["2.bias"]
    exact = json.loads(cli(server, "params", model_name, "2.weight", "--json").stdout)
    assert [p["name"] for p in exact] == ["2.weight"]
    assert client.parameters(model_name, path="1") == []  # ReLU: net[1].state_dict() is empty


def test_params_of_a_path_that_is_neither_is_not_found_with_nearby_names(
    server, client, model_name
):
    from paramserve.registry.errors import NotFound

    client.create_model(model_name, "small_mlp")
    result = cli(server, "params", model_name, "2.wieght", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "has no parameter or submodule '2.wieght'" in result.stderr
    assert "2.weight" in result.stderr
    with pytest.raises(NotFound, match="'2'"):
        client.parameters(model_name, path="7")


def test_params_of_a_tied_submodule_name_their_twins_by_full_key(server, client, model_name):
    client.create_model(model_name, "tied_mlp")
    client.upload(model_name, reference_module("tied_mlp", False).state_dict())
    infos = {p.name: p.tied_with for p in client.parameters(model_name, path="4")}
    assert infos == {"weight": ("2.weight",), "bias": ("2.bias",)}


# ---- constant(v) with biases left alone -----------------------------------------------------


def init_42(module):
    """The guide's constant initializer of weights only (its ``init_constant10``, 42 here)."""
    if type(module) == nn.Linear:  # noqa: E721 - the guide's own test
        nn.init.constant_(module.weight, 42)


def test_constant_with_bias_kept_is_the_guides_init_42(server, client, model_name):
    net = reference_module("small_mlp", False)
    client.create_model(model_name, "small_mlp")
    client.upload(model_name, net.state_dict())
    cli(server, "init", f"{model_name}@1", "constant(42, bias=keep)", "--module", "2")
    net[2].apply(init_42)
    served = client.state_dict(model_name, 2)
    assert set(served) == set(net.state_dict())
    assert all(torch.equal(served[k], v) for k, v in net.state_dict().items())
    assert net[2].bias.item() != 0  # the bias really was left alone

    # plain constant(v) keeps its meaning: the guide's init_constant (bias zeroed)
    version = client.initialize(model_name, "constant(1)", 1)
    served = client.state_dict(model_name, version.number)
    assert torch.equal(served["0.bias"], torch.zeros(8))
    assert torch.equal(served["0.weight"], torch.ones(8, 4))


def test_init_help_names_the_bias_keep_form(server):
    assert "bias=keep" in cli(server, "init", "--help").stdout


# ---- FixedHiddenMLP as the guide writes it --------------------------------------------------


class GuideFixedHiddenMLP(nn.Module):
    """The guide's class, word for word: ``rand_weight`` is a plain attribute."""

    def __init__(self):
        super().__init__()
        self.rand_weight = torch.rand((20, 20), requires_grad=False)
        self.linear = nn.Linear(20, 20)

    def forward(self, X):
        X = self.linear(X)
        X = F.relu(torch.mm(X, self.rand_weight) + 1)
        X = self.linear(X)
        while X.abs().sum() > 1:
            X /= 2
        return X.sum()


def test_the_guides_fixed_hidden_mlp_is_refused_with_how_to_add_rand_weight(
    server, client, model_name, tmp_path
):
    torch.manual_seed(7)
    net = GuideFixedHiddenMLP()
    assert "rand_weight" not in net.state_dict()
    client.create_model(model_name, "fixed_hidden_mlp")
    save_file(net.state_dict(), tmp_path / "guide.safetensors")
    refused = cli(server, "upload", model_name, str(tmp_path / "guide.safetensors"), check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "'rand_weight'" in refused.stderr
    assert "state_dict['rand_weight'] = net.rand_weight" in refused.stderr  # the fix, spelled

    # following the message: the served model reproduces the guide's net exactly
    state = net.state_dict()
    state["rand_weight"] = net.rand_weight
    save_file(state, tmp_path / "fixed.safetensors")
    cli(server, "upload", model_name, str(tmp_path / "fixed.safetensors"))
    x = torch.rand(2, 20)
    np.save(tmp_path / "x.npy", x.numpy())
    cli(
        server,
        "infer",
        model_name,
        "--input",
        str(tmp_path / "x.npy"),
        "--output",
        str(tmp_path / "y.npy"),
    )
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "y.npy")).reshape(()), net(x).detach())


def test_a_nested_constant_is_named_by_its_python_path(client, model_name):
    from paramserve.registry.errors import InvalidArgument

    client.create_model(model_name, "chimera")
    state = reference_module("chimera", False).state_dict()
    del state["2.rand_weight"]
    with pytest.raises(
        InvalidArgument, match=r"state_dict\['2.rand_weight'\] = net\[2\].rand_weight"
    ):
        client.upload(model_name, state)
