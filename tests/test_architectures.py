"""The built-in architectures reproduce the builders' guide, and users can add their own."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from paramserve.registry import (AlreadyExists, InvalidArgument, NotFound, all_architectures,
                                 architecture, get_architecture)
from paramserve.registry.architectures import load_entry_points, load_module
from paramserve.registry.builtin import CenteredLayer, MyLinear

from conftest import ALL_BUILTINS, LAZY_BUILTINS, example_input


def build(name, lazy=False, seed=0, **config):
    if lazy:
        config["in_features"] = None
    return get_architecture(name).build(config, seed=seed)


def test_all_design_names_are_registered():
    assert [a.name for a in all_architectures() if a.name in ALL_BUILTINS] == sorted(ALL_BUILTINS)


def test_small_mlp_state_dict_and_named_parameters_match_the_guide():
    net = build("small_mlp")
    assert list(net[2].state_dict()) == ["weight", "bias"]
    assert [(n, tuple(p.shape)) for n, p in net[0].named_parameters()] == [
        ("weight", (8, 4)), ("bias", (8,))]
    assert [(n, tuple(p.shape)) for n, p in net.named_parameters()] == [
        ("0.weight", (8, 4)), ("0.bias", (8,)), ("2.weight", (1, 8)), ("2.bias", (1,))]
    assert isinstance(net[2].bias, nn.Parameter) and net[2].weight.grad is None


def test_rgnet_keeps_block_names_with_spaces_and_prints_like_the_guide():
    net = build("rgnet")
    names = [n for n, _ in net.named_parameters()]
    assert names[:4] == ["0.block 0.0.weight", "0.block 0.0.bias", "0.block 0.2.weight",
                         "0.block 0.2.bias"]
    assert names[-2:] == ["1.weight", "1.bias"] and len(names) == 18
    assert net[0][1][0].bias.shape == (8,)
    printed = str(net)
    assert "(block 3): Sequential(" in printed
    assert "(1): Linear(in_features=4, out_features=1, bias=True)" in printed
    assert net(torch.rand(2, 4)).shape == (2, 1)


def test_nested_modules_name_their_parameters_by_path():
    assert [n for n, _ in build("nest_mlp").named_parameters()] == [
        "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "linear.weight",
        "linear.bias"]
    chimera = build("chimera")
    assert list(chimera.state_dict())[-3:] == ["2.rand_weight", "2.linear.weight",
                                               "2.linear.bias"]
    assert chimera(torch.rand(2, 20)).shape == ()


def test_fixed_hidden_mlp_constant_is_a_seeded_persistent_buffer():
    a, b, c = build("fixed_hidden_mlp", seed=7), build("fixed_hidden_mlp", seed=7), \
        build("fixed_hidden_mlp", seed=8)
    assert "rand_weight" in a.state_dict()
    assert "rand_weight" not in dict(a.named_parameters())
    assert torch.equal(a.rand_weight, b.rand_weight) and not torch.equal(a.rand_weight,
                                                                         c.rand_weight)
    out = a(torch.rand(2, 20))
    assert out.shape == () and out.abs() <= 1


def test_fixed_hidden_mlp_stops_on_infinite_input():
    out = build("fixed_hidden_mlp")(torch.full((2, 20), float("inf")))
    assert not torch.isfinite(out)


def test_fixed_hidden_mlp_refuses_a_width_its_shared_layer_cannot_take():
    with pytest.raises(InvalidArgument, match="must equal features"):
        build("fixed_hidden_mlp", in_features=16)


def test_tied_mlp_shares_one_parameter_object():
    net = build("tied_mlp")
    assert net[2].weight is net[4].weight
    net(torch.rand(2, 4))
    with torch.no_grad():
        net[2].weight.data[0, 0] = 100
    assert torch.equal(net[2].weight.data[0], net[4].weight.data[0])
    assert list(net.state_dict()).count("4.weight") == 1 and "4.weight" in net.state_dict()


def test_centered_layers_subtract_the_mean():
    assert torch.equal(CenteredLayer()(torch.tensor([1.0, 2, 3, 4, 5])),
                       torch.tensor([-2.0, -1, 0, 1, 2]))
    y = build("centered_mlp")(torch.rand(4, 8))
    assert y.shape == (4, 128) and abs(y.mean().item()) < 1e-5
    assert not get_architecture("centered_mlp").batchable


def test_my_linear_net_uses_weight_in_by_out_and_relu():
    layer = MyLinear(5, 3)
    assert layer.weight.shape == (5, 3)
    assert (layer(torch.rand(2, 5)) >= 0).all()
    assert build("my_linear_net")(torch.randn(5, 64)).shape == (5, 1)


@pytest.mark.parametrize("name", LAZY_BUILTINS)
def test_lazy_variant_has_uninitialized_parameters_until_the_first_input(name):
    net = build(name, lazy=True)
    lazy = [n for n, p in net.state_dict(keep_vars=True).items()
            if isinstance(p, UninitializedParameter)]
    assert lazy, "the lazy variant must start with uninitialized parameters"
    with torch.no_grad():
        net(example_input(name, lazy=True))
    fixed = build(name)
    assert {n: tuple(t.shape) for n, t in net.state_dict().items()} == {
        n: tuple(t.shape) for n, t in fixed.state_dict().items()}


def test_lazy_shapes_follow_the_first_input_width():
    net = build("sequential_mlp", lazy=True)
    with torch.no_grad():
        net(torch.rand(2, 33))
    assert net[0].weight.shape == (256, 33) and net[2].weight.shape == (10, 256)


@pytest.mark.parametrize("name", ALL_BUILTINS)
def test_same_seed_builds_bit_identical_modules(name):
    a, b = build(name, seed=3).state_dict(), build(name, seed=3).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_is_checked_with_the_valid_keys_in_the_message():
    with pytest.raises(InvalidArgument, match="hidden_features"):
        get_architecture("mlp").resolve_config({"hiden": 3})
    with pytest.raises(NotFound, match="known"):
        get_architecture("no_such_arch")


def test_user_architecture_from_a_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent('''
        from torch import nn
        from paramserve.registry import architecture

        @architecture("user_double", defaults={"in_features": 3}, example_input_shape=(1, 3))
        def user_double(in_features):
            """Doubles a linear layer's output."""
            return nn.Sequential(nn.Linear(in_features, in_features))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    load_module("my_models")
    arch = get_architecture("user_double")
    assert arch.doc == "Doubles a linear layer's output." and arch.batchable
    with pytest.raises(AlreadyExists):
        architecture("user_double", example_input_shape=(1,))(lambda: nn.Identity())
    with pytest.raises(NotFound, match="cannot import"):
        load_module("no_such_module_here")
    sys.modules.pop("my_models", None)


def test_user_architecture_from_an_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "ep_models.py"
    pkg.write_text(textwrap.dedent('''
        from torch import nn
        from paramserve.registry import architecture

        @architecture("entry_point_net", example_input_shape=(1, 2))
        def entry_point_net():
            """From an entry point."""
            return nn.Linear(2, 2)
    '''))
    dist = tmp_path / "ep_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[paramserve.architectures]\nentry_point_net = ep_models\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "entry_point_net" in load_entry_points()
    assert get_architecture("entry_point_net").build().weight.shape == (2, 2)
