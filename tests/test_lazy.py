"""Lazy initialization: shapes from the first input, init policy and seed, exactly one version."""

from __future__ import annotations

import threading

import pytest
import torch

from paramserve.registry import FailedPrecondition, InvalidArgument, InvalidStateDict, Store

from conftest import LAZY_BUILTINS, blob_files, example_input


@pytest.mark.parametrize("name", LAZY_BUILTINS)
def test_first_input_materializes_initializes_and_stores_a_version(store, name):
    store.create_model("lazy", name, {"in_features": None}, seed=11)
    before = {p.name: p for p in store.parameters("lazy")}
    assert any(not p.initialized and p.spec.shape is None for p in before.values())
    x = example_input(name, lazy=True)
    version = store.materialize("lazy", tuple(x.shape))
    assert (version.number, version.origin, version.parent) == (1, "lazy-init", None)
    after = store.parameters("lazy")
    assert all(p.initialized and p.spec.shape is not None for p in after)
    module = store.load("lazy")
    assert module(x).shape == module(x).shape  # it runs
    assert "Lazy" not in store.module_tree("lazy")


def test_shapes_follow_the_first_input_and_later_inputs_see_the_same_version(store):
    store.create_model("lazy", "sequential_mlp", {"in_features": None})
    version = store.materialize("lazy", (3, 33))
    shapes = {e.name: e.spec.shape for e in version.manifest}
    assert shapes["0.weight"] == (256, 33) and shapes["2.weight"] == (10, 256)
    assert store.materialize("lazy", (5, 7)) == version  # the first input decided
    assert "in_features=33" in store.module_tree("lazy")


def test_same_seed_same_parameters_across_stores(tmp_path):
    results = []
    for run in range(2):
        with Store(data_dir=tmp_path / str(run)) as store:
            store.create_model("lazy", "fixed_hidden_mlp", {"in_features": None},
                               init="xavier_uniform", seed=5)
            store.materialize("lazy", (2, 20))
            results.append(store.state_dict("lazy"))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_init_policy_is_applied_at_materialization(store):
    store.create_model("lazy", "small_mlp", {"in_features": None}, init="constant(0.5)")
    store.materialize("lazy", (2, 6))
    state = store.state_dict("lazy")
    assert torch.all(state["0.weight"] == 0.5) and torch.all(state["0.bias"] == 0)


def test_concurrent_first_requests_create_exactly_one_version(store):
    store.create_model("lazy", "tied_mlp", {"in_features": None})
    barrier = threading.Barrier(16)
    versions, errors = [], []

    def first_request():
        barrier.wait()
        try:
            versions.append(store.materialize("lazy", (2, 4)))
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=first_request) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.list_versions("lazy")) == 1 and len({v.sha256 for v in versions}) == 1


def test_two_stores_on_one_database_create_one_version(tmp_path):
    """Two replicas (two Store objects, one database, one blob dir) race on a first request."""
    stores = [Store(data_dir=tmp_path) for _ in range(2)]
    stores[0].create_model("lazy", "nest_mlp", {"in_features": None})
    barrier = threading.Barrier(8)
    versions = []

    def first_request(store):
        barrier.wait()
        versions.append(store.materialize("lazy", (2, 20)).number)

    threads = [threading.Thread(target=first_request, args=(stores[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert versions == [1] * 8 and len(stores[1].list_versions("lazy")) == 1
    for store in stores:
        store.close()


def test_an_input_the_model_cannot_take_creates_nothing(store):
    store.create_model("lazy", "fixed_hidden_mlp", {"in_features": None})
    with pytest.raises(InvalidArgument, match=r"input shape \[2, 30\] does not fit"):
        store.materialize("lazy", (2, 30))
    with pytest.raises(InvalidArgument, match="must be positive"):
        store.materialize("lazy", (0, 20))
    assert store.list_versions("lazy") == [] and blob_files(store) == []


def test_a_fixed_model_without_version_needs_an_upload(store):
    store.create_model("fixed", "mlp")
    with pytest.raises(FailedPrecondition, match="paramserve upload fixed"):
        store.materialize("fixed", (2, 20))


def test_uploads_to_a_lazy_model_fix_its_shapes_and_are_checked_strictly(store):
    store.create_model("lazy", "sequential_mlp", {"in_features": None})
    net = torch.nn.Sequential(torch.nn.Linear(30, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    version = store.upload("lazy", net.state_dict())
    assert dict((e.name, e.spec.shape) for e in version.manifest)["0.weight"] == (256, 30)
    x = torch.randn(4, 30)
    assert torch.equal(store.load("lazy")(x), net(x))
    wrong = {k: v.clone() for k, v in net.state_dict().items()}
    wrong["2.weight"] = torch.zeros(10, 128)  # the width after layer 0 is fixed by the config
    with pytest.raises(InvalidStateDict, match=r"'2.weight': expected F32\[10, 256\]"):
        store.upload("lazy", wrong)
