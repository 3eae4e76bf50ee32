"""The store: models, versions, aliases, round trips of every built-in, and blob integrity."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from safetensors.torch import save_file, save_model
from sqlalchemy import create_engine, text

from paramserve.registry import (AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument,
                                 NotFound, Store)
from paramserve.registry.blobs import BlobStore

from conftest import (ALL_BUILTINS, LAZY_BUILTINS, blob_files, config_for, example_input,
                      reference_module)

# Every test that takes ``store`` runs on SQLite and on PostgreSQL (conftest.py).
pytestmark = pytest.mark.store_backends("sqlite", "postgresql")

VARIANTS = [(name, False) for name in ALL_BUILTINS] + [(name, True) for name in LAZY_BUILTINS]


def torch_saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def as_format(state: dict, fmt: str, tmp_path):
    if fmt == "dict":
        return state
    if fmt == "torch":
        return torch_saved(state)
    if fmt == "safetensors-file":
        path = tmp_path / "upload.safetensors"
        save_file({k: v.contiguous() for k, v in _untied(state).items()}, path)
        return path
    raise AssertionError(fmt)


def _untied(state: dict) -> dict:
    """A copy safetensors' save_file accepts (it refuses tensors sharing memory)."""
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.parametrize("name, lazy", VARIANTS, ids=[f"{n}{'-lazy' if z else ''}"
                                                      for n, z in VARIANTS])
def test_every_builtin_gives_the_same_outputs_after_upload_and_load(store, name, lazy):
    module = reference_module(name, lazy)
    x = example_input(name, lazy, seed=5)
    expected = module(x)
    store.create_model("m", name, config_for(name, lazy))
    version = store.upload("m", module.state_dict())
    loaded = store.load("m", version.number)
    assert torch.equal(loaded(x), expected)
    assert loaded.state_dict().keys() == module.state_dict().keys()
    assert store.module_tree("m") == str(module)


@pytest.mark.parametrize("fmt", ["dict", "torch", "safetensors-file"])
def test_upload_formats_store_one_canonical_blob(store, tmp_path, fmt):
    module = reference_module("tied_mlp", False)
    store.create_model("tied", "tied_mlp")
    version = store.upload("tied", as_format(module.state_dict(), fmt, tmp_path))
    assert version.number == 1 and version.origin == "upload"
    again = store.upload("tied", module.state_dict())
    assert again.sha256 == version.sha256 and again.number == 2  # content-addressed
    assert len([p for p in blob_files(store) if p.suffix == ".safetensors"]) == 1


def test_tied_parameters_are_stored_once_and_tied_again_on_load(store):
    module = reference_module("tied_mlp", False)
    store.create_model("tied", "tied_mlp")
    version = store.upload("tied", module.state_dict())
    manifest = {e.name: e for e in version.manifest}
    assert manifest["4.weight"].tied_to == "2.weight" and manifest["2.weight"].tied_to is None
    loaded = store.load("tied")
    assert loaded[2].weight is loaded[4].weight
    state = store.state_dict("tied")
    assert set(state) == set(module.state_dict()) and state["4.weight"] is state["2.weight"]
    with open(store.blobs.path(version.sha256), "rb") as f:
        assert f.read(4096).count(b'"4.weight"') == 1  # only in the metadata


def test_safetensors_save_model_output_with_a_tied_key_left_out_is_accepted(store, tmp_path):
    module = reference_module("tied_mlp", False)
    save_model(module, tmp_path / "m.safetensors")
    store.create_model("tied", "tied_mlp")
    assert torch.equal(store.load("tied", store.upload("tied", tmp_path / "m.safetensors")
                                  .number)(torch.ones(2, 4)), module(torch.ones(2, 4)))


def test_models_list_get_delete_and_names(store):
    store.create_model("b", "mlp", {"hidden_features": 32}, init="zeros", seed=4,
                       description="small")
    store.create_model("a", "sequential_mlp", {"in_features": None})
    assert [m.name for m in store.list_models()] == ["a", "b"]
    b = store.get_model("b")
    assert (b.config["hidden_features"], b.init, b.seed, b.lazy) == (32, "zeros", 4, False)
    assert store.get_model("a").lazy
    with pytest.raises(AlreadyExists):
        store.create_model("a", "mlp")
    for bad in ["", "../x", "a/b", "x" * 200, " space"]:
        with pytest.raises(InvalidArgument):
            store.create_model(bad, "mlp")
    with pytest.raises(InvalidArgument, match="unknown init scheme"):
        store.create_model("c", "mlp", init="gaussian")
    with pytest.raises(NotFound):
        store.create_model("c", "nope")
    store.delete_model("b")
    with pytest.raises(NotFound, match="paramserve create"):
        store.get_model("b")


def test_versions_aliases_and_resolution(store):
    store.create_model("m", "small_mlp")
    v1 = store.upload("m", reference_module("small_mlp", False, seed=1).state_dict(),
                      alias="production")
    v2 = store.upload("m", reference_module("small_mlp", False, seed=2).state_dict())
    assert [v.number for v in store.list_versions("m")] == [1, 2]
    assert store.resolve("m").number == 2 and store.resolve("m", "latest").number == 2
    assert store.resolve("m", "production").number == 1 and store.resolve("m", "1") == v1
    assert store.resolve("m", "production").aliases == ("production",)
    store.set_alias("m", "production", 2)
    assert store.resolve("m", "production").sha256 == v2.sha256
    assert store.get_model("m").aliases == {"production": 2}
    for bad in ["latest", "7"]:
        with pytest.raises(InvalidArgument, match="reserved"):
            store.set_alias("m", bad, 1)
    with pytest.raises(NotFound, match="no version 9"):
        store.set_alias("m", "staging", 9)
    with pytest.raises(NotFound, match="no alias 'staging'"):
        store.resolve("m", "staging")
    store.delete_alias("m", "production")
    with pytest.raises(NotFound):
        store.delete_alias("m", "production")


def test_deleting_versions_keeps_shared_blobs_and_removes_unreferenced_ones(store):
    store.create_model("m", "small_mlp")
    state = reference_module("small_mlp", False).state_dict()
    v1, v2 = store.upload("m", state), store.upload("m", state)
    v3 = store.upload("m", reference_module("small_mlp", False, seed=9).state_dict(),
                      alias="x")
    store.delete_version("m", 1)
    assert store.blobs.exists(v2.sha256)
    with pytest.raises(FailedPrecondition, match="'x'"):
        store.delete_version("m", 3)  # an alias points at it
    assert store.delete_version("m", 3, force=True) == ["x"]
    assert not store.blobs.exists(v3.sha256) and "x" not in store.get_model("m").aliases
    assert store.upload("m", state).number == 4  # numbers are never reused below the max
    store.delete_model("m")
    assert not store.blobs.exists(v1.sha256)


def test_a_model_with_no_version_cannot_be_loaded(store):
    store.create_model("m", "mlp")
    with pytest.raises(NotFound, match="no versions yet"):
        store.load("m")


def corrupt(store: Store, sha: str, offset: int = -3) -> None:
    path = store.blobs.path(sha)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_blob_is_refused_with_data_loss_naming_it(store):
    store.create_model("m", "mlp")
    version = store.upload("m", reference_module("mlp", False).state_dict())
    corrupt(store, version.sha256)
    for read in (lambda: store.load("m"), lambda: store.state_dict("m"),
                 lambda: store.blobs.verify(version.sha256)):
        with pytest.raises(DataLoss, match=version.sha256):
            read()


def test_a_missing_blob_is_data_loss(store):
    store.create_model("m", "mlp")
    version = store.upload("m", reference_module("mlp", False).state_dict())
    store.blobs.path(version.sha256).unlink()
    with pytest.raises(DataLoss, match="missing"):
        store.load("m")


def test_a_failed_blob_write_leaves_no_file(tmp_path):
    blobs = BlobStore(tmp_path)

    def fail(file):
        file.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        blobs.write(fail)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_concurrent_uploads_get_distinct_numbers(store):
    store.create_model("m", "small_mlp")
    states = [reference_module("small_mlp", False, seed=s).state_dict() for s in range(8)]
    numbers, errors = [], []

    def upload(state):
        try:
            numbers.append(store.upload("m", state).number)
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=upload, args=(s,)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(numbers) == list(range(1, 9))


def test_the_store_reopens_on_the_same_files(tmp_path):
    with Store(data_dir=tmp_path) as first:
        first.create_model("m", "small_mlp")
        version = first.upload("m", reference_module("small_mlp", False).state_dict())
    with Store(data_dir=tmp_path) as second:
        assert second.resolve("m") == version
    assert (tmp_path / "registry.db").is_file()


def test_an_unknown_schema_revision_is_refused_with_the_upgrade_command(tmp_path):
    Store(data_dir=tmp_path).close()
    engine = create_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'future'"))
    engine.dispose()
    with pytest.raises(FailedPrecondition, match="paramserve db upgrade"):
        Store(data_dir=tmp_path)


def test_a_foreign_non_empty_database_is_refused(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE other (id INTEGER)"))
    engine.dispose()
    with pytest.raises(FailedPrecondition, match="revision None"):
        Store(data_dir=tmp_path)


@pytest.mark.store_backends("sqlite")
def test_sqlite_runs_in_wal_mode_with_foreign_keys(store):
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_the_store_fixture_runs_on_the_backend_it_names(store, request):
    backend = request.node.callspec.params["store"]
    assert store.engine.dialect.name == backend
