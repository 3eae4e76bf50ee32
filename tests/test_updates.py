"""Pushed updates: gradients + an optimizer step → a version; optimizer state versioned with it.

Each step must equal the same ``torch.optim`` step in-process, bit for bit, and continue the
state (momentum, Adam's moments) from the parent version exactly. Concurrent updates on one
parent: the first commits, the others are ABORTED and told which version to rebase onto.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from conftest import ServerProcess
from torch import nn

from paramserve.registry import Store
from paramserve.registry.check import check
from paramserve.registry.errors import Aborted, InvalidArgument, NotFound
from paramserve.registry.updates import parse_optimizer

pytestmark = pytest.mark.store_backends("sqlite", "postgresql")  # the store's tests on both

CONFIG = {"in_features": 4, "hidden": 8, "out_features": 2}


def make_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def batch(i: int):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)


def grads_of(net: nn.Module, i: int) -> dict[str, torch.Tensor]:
    net.zero_grad()
    X, Y = batch(i)
    nn.functional.mse_loss(net(X), Y).backward()
    return {k: p.grad.clone() for k, p in net.named_parameters()}


def stored(store, name="m", ref=None) -> dict[str, torch.Tensor]:
    return store.state_dict(name, ref)


def same(a: dict, net: nn.Module) -> bool:
    return all(torch.equal(a[k], v) for k, v in net.state_dict().items())


@pytest.fixture
def model(store):
    store.create_model("m", "sequential_mlp", CONFIG)
    net = make_net()
    store.upload("m", dict(net.state_dict()))
    return net


OPTIMIZERS = [
    ("sgd(lr=0.1)", lambda p: torch.optim.SGD(p, lr=0.1)),
    ("sgd(lr=0.1, momentum=0.9)", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    (
        "adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6)",
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-6),
    ),
]


@pytest.mark.parametrize("spec,make", OPTIMIZERS, ids=["sgd", "momentum", "adam"])
def test_steps_equal_torch_optim_and_state_continues(store, model, spec, make):
    net, opt = model, make(model.parameters())
    for i in range(4):
        grads = grads_of(net, i)
        version = store.apply_update("m", grads, spec)
        opt.step()
        assert version.origin == "update" and version.parent == version.number - 1
        assert version.provenance["step"] == i + 1
        assert version.provenance["state"] == ("fresh" if i == 0 else "continued")
        assert version.optimizer_sha256 and store.blobs.exists(version.optimizer_sha256)
        assert same(stored(store), net), f"step {i} differs from torch.optim"


def test_provenance_records_the_step(store, model):
    v = store.apply_update("m", {"2.bias": torch.ones(2)}, "sgd(0.5, 0.9)", note="first push")
    p = v.provenance
    assert p["kind"] == "update" and p["optimizer"] == "sgd"
    assert (p["lr"], p["momentum"], p["step"]) == (0.5, 0.9, 1)
    assert p["params"] == ["2.bias"] and p["params_count"] == 1
    assert v.note == "first push"
    assert torch.equal(stored(store)["2.bias"], model.state_dict()["2.bias"] - 0.5)


def test_a_step_from_a_version_without_state_starts_fresh(store, model):
    g = {"2.bias": torch.ones(2)}
    store.apply_update("m", g, "sgd(lr=1, momentum=0.5)")  # v2: buffer = g
    store.apply_update("m", g, "sgd(lr=1, momentum=0.5)")  # v3: buffer = 1.5 g
    v4 = store.apply_update("m", g, "sgd(lr=1, momentum=0.5)", ref=1)  # from v1: fresh
    assert v4.parent == 1 and v4.provenance["state"] == "fresh"
    assert torch.equal(stored(store, ref=4)["2.bias"], stored(store, ref=2)["2.bias"])
    v5 = store.apply_update("m", g, "sgd(lr=1, momentum=0.5)", ref=3)  # continues v3's
    assert v5.provenance["step"] == 3
    expected = stored(store, ref=3)["2.bias"] - 1.75
    assert torch.equal(stored(store, ref=5)["2.bias"], expected)


def test_partial_updates_carry_other_state(store, model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i, names in enumerate([None, ["0.weight"], None]):
        grads = grads_of(model, i)
        if names:
            for k, p in model.named_parameters():
                if k not in names:
                    p.grad = None  # torch.optim skips a parameter without a gradient
            grads = {k: grads[k] for k in names}
        store.apply_update("m", grads, "sgd(lr=0.1, momentum=0.9)")
        opt.step()
        assert same(stored(store), model)


def test_deltas_add_and_keep_the_state(store, model):
    v2 = store.apply_update("m", {"2.bias": torch.ones(2)}, "adam(lr=0.01)")
    v3 = store.apply_update("m", {"2.bias": torch.full((2,), 0.25)}, deltas=True)
    assert v3.provenance["mode"] == "delta" and v3.optimizer_sha256 == v2.optimizer_sha256
    assert torch.equal(stored(store, ref=3)["2.bias"], stored(store, ref=2)["2.bias"] + 0.25)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "sgd()",
        "sgd(lr=0)",
        "sgd(lr=-1)",
        "sgd(lr=float('nan'))",
        "sgd(lr=1e999)",
        "sgd(lr=0.1, momentum=1)",
        "adam(lr=0.1, betas=(0.9, 1.0))",
        "adam(lr=0.1, betas=(0.9,))",
        "adam(lr=0.1, eps=0)",
        "rmsprop(lr=0.1)",
        "sgd(lr=0.1, nesterov=True)",
        "__import__('os')",
        "sgd(lr=0.1, lr=0.2)",
        "sgd(" + "1" * 300 + ")",
        "sgd(lr=True)",
    ],
)
def test_bad_optimizers_are_refused(spec):
    with pytest.raises(InvalidArgument):
        parse_optimizer(spec)


def test_bad_values_are_refused_and_nothing_is_written(store, model):
    before = len(store.list_versions("m"))
    bad = [
        ({"nope": torch.ones(1)}, NotFound),
        ({"2.bias": torch.ones(3)}, InvalidArgument),
        ({"2.bias": torch.tensor([1.0, float("nan")])}, InvalidArgument),
        ({"2.bias": torch.ones(2, dtype=torch.int64)}, InvalidArgument),
        ({}, InvalidArgument),
    ]
    for values, error in bad:
        with pytest.raises(error):
            store.apply_update("m", values, "sgd(lr=0.1)")
    assert len(store.list_versions("m")) == before
    assert not check(store).orphan_blobs


def test_gc_keeps_a_referenced_state_blob_and_collects_it_with_its_version(store, model):
    v2 = store.apply_update("m", grads_of(model, 0), "adam(lr=0.01)")
    v3 = store.apply_update("m", grads_of(model, 1), "adam(lr=0.01)")
    report = check(store)
    assert report.ok and not report.orphan_blobs and report.versions_checked == 3
    store.delete_version("m", 2)
    assert not store.blobs.exists(v2.optimizer_sha256)
    assert store.blobs.exists(v3.optimizer_sha256)
    store.delete_model("m")
    assert not store.blobs.exists(v3.optimizer_sha256)
    assert list(store.blobs.list_blobs()) == []


def test_a_stale_parent_is_aborted_and_leaves_nothing(store, model):
    store.set_alias("m", "head", 1)
    store.apply_update("m", {"2.bias": torch.ones(2)}, "sgd(lr=0.1)", ref="head")
    assert store.resolve("m", "head").number == 2  # the alias moved with the update
    blobs = len(list(store.blobs.list_blobs()))
    for ref in ("head", None):
        with pytest.raises(Aborted, match="rebase onto v2"):
            store.apply_update("m", {"2.bias": torch.ones(2)}, "adam(lr=0.1)", ref=ref, parent=1)
    assert len(list(store.blobs.list_blobs())) == blobs
    assert check(store).ok and not check(store).held_blobs
    v = store.apply_update("m", {"2.bias": torch.ones(2)}, "sgd(lr=0.1)", ref=1)  # a branch
    assert v.parent == 1


# ---- through a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("updates")
    tokens = tmp / "tokens"
    tokens.write_text("full-token-1\nread-token-2 read\n")
    srv = ServerProcess(tmp / "data", "--auth-token-file", str(tokens))
    yield srv
    srv.stop()


def test_read_only_tokens_may_not_update_or_train(token_server):
    from paramserve.service.client import Client, ServerError

    with Client(token_server.address, token="full-token-1") as full:
        full.create_model("ro", "sequential_mlp", CONFIG)
        full.upload("ro", dict(make_net().state_dict()))
    with Client(token_server.address, token="read-token-2") as reader:
        for call in (
            lambda: reader.apply_update("ro", {"2.bias": torch.ones(2)}, "sgd(lr=0.1)"),
            lambda: reader.train("ro", torch.ones(3, 4), torch.ones(3, 2), "mse", "sgd(lr=1)"),
        ):
            with pytest.raises(ServerError) as info:
                call()
            assert info.value.code.name == "PERMISSION_DENIED"
        assert len(reader.list_versions("ro")) == 1


def test_concurrent_pushes_race_to_one_chain(server, tmp_path):
    """Workers pull the head, push gradients computed from it, rebase on ABORTED: every
    accepted push is one version, parents form one chain, no update is lost."""
    from paramserve.service.client import Client

    with Client(server.address, timeout_s=60) as c:
        c.create_model("race", "sequential_mlp", CONFIG)
        c.upload("race", dict(make_net().state_dict()))
    workers, pushes = 6, 4
    accepted, aborted, errors = [], [], []

    def worker():
        with Client(server.address, timeout_s=60) as c:
            done = 0
            while done < pushes:
                head = c.get_model("race").latest_version
                try:
                    v = c.apply_update(
                        "race", {"2.bias": torch.ones(2)}, "sgd(lr=0.01, momentum=0.9)", parent=head
                    )
                except Aborted as err:
                    aborted.append(str(err))
                    continue
                except Exception as err:  # noqa: BLE001  (reported below)
                    errors.append(repr(err))
                    return
                accepted.append((v.number, v.parent))
                done += 1

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(accepted) == workers * pushes
    assert all("rebase onto v" in m for m in aborted)
    with Client(server.address) as c:
        versions = c.list_versions("race")
    assert len(versions) == 1 + len(accepted)
    chain = sorted((v.number, v.parent) for v in versions if v.origin == "update")
    assert [p for _, p in chain] == [n - 1 for n, _ in chain]  # one line, nothing forked
    with Store(data_dir=server.data_dir) as store:  # the server's registry, read beside it
        steps = sorted(v.provenance["step"] for v in store.list_versions("race")[1:])
    assert steps == list(range(1, len(accepted) + 1))  # momentum continued at every push
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "paramserve.service.cli",
            "check",
            "--data-dir",
            str(server.data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_reports_a_missing_state_blob(store, model):
    v2 = store.apply_update("m", grads_of(model, 0), "adam(lr=0.01)")
    store.blobs.path(v2.optimizer_sha256).unlink()
    report = check(store)
    assert not report.ok and report.missing_blobs == [f"m@2 {v2.optimizer_sha256}"]


def test_concurrent_store_pushes_abort_all_but_one_per_parent(store, model):
    """The commit condition holds on both databases (PostgreSQL: two writers that read the
    same head collide on the version number; the retry sees the new head and aborts)."""
    accepted, errors = [], []

    def worker():
        done = 0
        while done < 3:
            head = store.latest_or_none("m").number
            try:
                v = store.apply_update("m", {"2.bias": torch.ones(2)}, "sgd(lr=0.1)", parent=head)
            except Aborted:
                continue
            except Exception as err:  # noqa: BLE001  (reported below)
                errors.append(repr(err))
                return
            accepted.append(v)
            done += 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    versions = store.list_versions("m")
    assert len(versions) == 1 + len(accepted) == 13
    assert [v.parent for v in versions[1:]] == [v.number - 1 for v in versions[1:]]
    expected = stored(store, ref=1)["2.bias"]
    for _ in range(12):
        expected = expected - 0.1 * torch.ones(2)
    assert torch.equal(stored(store)["2.bias"], expected)  # no update lost, none doubled
    assert check(store).ok
