"""Init schemes, patches and parameter queries: the guide's parameter-management scenarios."""

from __future__ import annotations

import math

import pytest
import torch

from paramserve.registry import InvalidArgument, NotFound
from paramserve.registry.schemes import parse_scheme
from paramserve.registry.slicing import parse_index, split_param

from conftest import reference_module


@pytest.fixture
def net_store(store):
    """The guide's small net (4→8→1) with one uploaded version."""
    store.create_model("net", "small_mlp", seed=2)
    store.upload("net", reference_module("small_mlp", False).state_dict())
    return store


def test_normal_zeros_the_bias_and_records_the_parent(net_store):
    version = net_store.initialize("net", "normal(mean=0, std=0.01)")
    assert (version.number, version.origin, version.parent) == (2, "init", 1)
    state = net_store.state_dict("net")
    assert torch.all(state["0.bias"] == 0) and torch.all(state["2.bias"] == 0)
    assert 0 < state["0.weight"].std() < 0.05 and state["0.weight"].abs().max() < 0.1


def test_constant_then_per_block_schemes_as_in_the_guide(net_store):
    net_store.initialize("net", "constant(1)")
    state = net_store.state_dict("net")
    assert torch.equal(state["0.weight"][0], torch.ones(4)) and state["0.bias"][0] == 0
    net_store.initialize("net", "xavier_uniform", module_path="0")
    net_store.initialize("net", "constant(10)", module_path="2")
    state = net_store.state_dict("net")
    bound = math.sqrt(6 / (4 + 8))
    assert state["0.weight"].abs().max() <= bound and not torch.all(state["0.weight"] == 1)
    assert torch.equal(state["2.weight"], torch.full((1, 8), 10.0))
    assert [v.parent for v in net_store.list_versions("net")] == [None, 1, 2, 3]


def test_uniform_zeros_and_the_guides_custom_scheme(net_store):
    net_store.initialize("net", "uniform(-0.5, 0.25)")
    w = net_store.state_dict("net")["0.weight"]
    assert w.min() >= -0.5 and w.max() <= 0.25
    net_store.initialize("net", "my_init")
    w = net_store.state_dict("net")["0.weight"]
    assert torch.all((w == 0) | (w.abs() >= 5)) and (w != 0).any() and w.abs().max() <= 10
    net_store.initialize("net", "zeros")
    assert all(torch.all(t == 0) for t in net_store.state_dict("net").values())


def test_same_seed_gives_bit_identical_parameters(net_store):
    a = net_store.initialize("net", "normal(0, 1)", ref=1, seed=42)
    b = net_store.initialize("net", "normal(0, 1)", ref=1, seed=42)
    c = net_store.initialize("net", "normal(0, 1)", ref=1, seed=43)
    assert a.sha256 == b.sha256 != c.sha256


def test_init_on_a_model_without_version_starts_from_its_build(store):
    store.create_model("fresh", "rgnet", seed=1)
    version = store.initialize("fresh", "normal(0, 0.01)", module_path="0.block 2")
    assert version.parent is None and version.number == 1
    state = store.state_dict("fresh")
    assert torch.all(state["0.block 2.0.bias"] == 0) and not torch.all(state["0.block 1.0.bias"]
                                                                        == 0)


def test_init_on_a_lazy_model_needs_an_input_shape(store):
    store.create_model("lazy", "mlp", {"in_features": None})
    with pytest.raises(Exception, match="input shape"):
        store.initialize("lazy", "zeros")
    version = store.initialize("lazy", "zeros", input_shape=(1, 12))
    assert {e.name: e.spec.shape for e in version.manifest}["hidden.weight"] == (256, 12)


@pytest.mark.parametrize("scheme, message", [
    ("gaussian", "unknown init scheme"), ("normal(0, 1, 2)", "takes 2"),
    ("constant", "needs argument 'value'"), ("uniform(1, 0)", "a <= b"),
    ("normal(std=-1)", ">= 0"), ("normal(sigma=1)", "no argument 'sigma'"),
    ("normal(std='x')", "must be a number"), ("import os", "cannot parse"),
    ("constant(inf)", "must be a number"), ("constant(1e999)", "finite"),
])
def test_bad_schemes_are_refused(net_store, scheme, message):
    with pytest.raises(InvalidArgument, match=message):
        net_store.initialize("net", scheme)
    assert len(net_store.list_versions("net")) == 1


def test_unknown_submodule_is_not_found(net_store):
    with pytest.raises(NotFound, match="no submodule '9'"):
        net_store.initialize("net", "zeros", module_path="9")


def test_patches_as_in_the_guide(store):
    store.create_model("net", "small_mlp")
    store.upload("net", reference_module("small_mlp", False).state_dict())
    before = store.state_dict("net")["0.weight"].clone()
    store.patch("net", "0.weight", 1, index=":", op="add")  # net[0].weight.data[:] += 1
    store.patch("net", "0.weight", 42, index="0, 0")          # net[0].weight.data[0, 0] = 42
    after = store.state_dict("net")["0.weight"]
    assert after[0, 0] == 42 and torch.allclose(after[1:], before[1:] + 1)
    assert torch.allclose(after[0, 1:], before[0, 1:] + 1)
    assert [v.origin for v in store.list_versions("net")] == ["upload", "patch", "patch"]
    store.patch("net", "2.bias", [3.5])
    assert store.state_dict("net")["2.bias"].tolist() == [3.5]
    store.patch("net", "0.weight", [[7, 8]], index="2:4, 0:2")
    assert store.tensor("net", "0.weight", index="2:4, 0:2").tolist() == [[7, 8], [7, 8]]


def test_patching_a_tied_parameter_changes_every_name(store):
    store.create_model("tied", "tied_mlp")
    store.upload("tied", reference_module("tied_mlp", False).state_dict())
    store.patch("tied", "2.weight", 100, index="0")  # net[2].weight.data[0] = 100
    state = store.state_dict("tied")
    assert torch.all(state["4.weight"][0] == 100) and state["4.weight"] is state["2.weight"]
    module = store.load("tied")
    assert module[2].weight is module[4].weight and torch.all(module[4].weight[0] == 100)


@pytest.mark.parametrize("param, index, value, error, message", [
    ("9.weight", None, 1, NotFound, "no parameter '9.weight'"),
    ("0.weight", "0, 9", 1, InvalidArgument, "does not fit '0.weight'"),
    ("0.weight", "a", 1, InvalidArgument, "cannot parse index"),
    ("0.weight", "0", [1, 2], InvalidArgument, "broadcasts to shape"),
    ("0.weight", None, "x", InvalidArgument, "number or an array"),
])
def test_bad_patches_change_nothing(net_store, param, index, value, error, message):
    with pytest.raises(error, match=message):
        net_store.patch("net", param, value, index=index)
    assert len(net_store.list_versions("net")) == 1


def test_index_parsing():
    assert parse_index("0, 0") == (0, 0)
    assert parse_index(":") == (slice(None),)
    assert parse_index("1:3, ::2, -1, ...") == (slice(1, 3), slice(None, None, 2), -1, Ellipsis)
    assert split_param("0.block 0.0.weight[0, :2]") == ("0.block 0.0.weight", "0, :2")
    for bad in ("1:2:0", "x", "0,,1", "__import__('os')", "..., ..."):
        with pytest.raises(InvalidArgument):
            parse_index(bad)
    assert str(parse_scheme("normal(0, 0.01)")) == "normal(mean=0, std=0.01)"


def test_parameter_listing_matches_state_dict_and_ties(store):
    store.create_model("tied", "tied_mlp")
    module = reference_module("tied_mlp", False)
    store.upload("tied", module.state_dict())
    infos = {p.name: p for p in store.parameters("tied", stats=True)}
    assert list(infos) == list(module.state_dict())
    assert infos["2.weight"].tied_with == ("4.weight",) and infos["0.weight"].tied_with == ()
    w = module[0].weight.detach()
    stats = infos["0.weight"].stats
    assert stats.min == pytest.approx(w.min().item()) and stats.std == pytest.approx(
        w.double().std().item())
    assert all(p.kind == "parameter" and p.requires_grad and p.initialized
               for p in infos.values())


def test_buffers_are_listed_as_buffers(store):
    store.create_model("fixed", "fixed_hidden_mlp")
    infos = {p.name: p for p in store.parameters("fixed")}
    assert infos["rand_weight"].kind == "buffer" and not infos["rand_weight"].requires_grad
    assert infos["linear.weight"].spec.shape == (20, 20)


def test_one_tensor_by_name_and_slice(store):
    store.create_model("rg", "rgnet")
    module = reference_module("rgnet", False)
    store.upload("rg", module.state_dict())
    assert torch.equal(store.tensor("rg", "0.block 1.0.bias"), module[0][1][0].bias.detach())
    assert torch.equal(store.tensor("rg", "0.block 1.0.weight", index="1, 2:"),
                       module[0][1][0].weight.detach()[1, 2:])
    with pytest.raises(NotFound, match="no entry"):
        store.tensor("rg", "0.block 9.0.bias")
