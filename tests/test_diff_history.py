"""Diff and history: what each version records (provenance, note, author), ``Registry.Diff``
streamed tensor by tensor from the blobs, ``paramserve log`` and migration 0004."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from alembic import command
from conftest import ServerProcess, fresh_postgres_database, reference_module
from sqlalchemy import create_engine, text

from paramserve.registry import Store
from paramserve.registry.database import alembic_config
from paramserve.registry.diff import diff_versions
from paramserve.service.client import Client


def cli(server, *args, token=None):
    extra = ["--token", token] if token else []
    result = subprocess.run(
        [sys.executable, "-m", "paramserve.service.cli", "--server", server.address, *extra, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def mlp_file(tmp_path, seed=1):
    from safetensors.torch import save_file

    state = {
        k: v.contiguous() for k, v in reference_module("mlp", False, seed).state_dict().items()
    }
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    return path, state


def test_diff_of_a_patch_is_its_one_tensor_with_numpy_figures(client, server, model_name, tmp_path):
    client.create_model(model_name, "mlp")
    path, state = mlp_file(tmp_path)
    v1 = client.upload(model_name, str(path))
    v2 = client.patch(model_name, "hidden.weight", 0.5, index="0:3, :", op="add", note="nudge")
    result = client.diff(model_name, v1.number, v2.number)
    assert not result["identical"] and result["tensors"] == 4 and result["changed"] == 1
    (d,) = result["diffs"]
    a = state["hidden.weight"].numpy().astype(np.float64)
    b = np.asarray(client.tensor(model_name, "hidden.weight", v2.number), np.float64)
    delta = a - b
    assert d["name"] == "hidden.weight" and d["status"] == "changed"
    assert d["changed_elements"] == int((a != b).sum()) == 3 * 20
    assert d["max_abs_diff"] == pytest.approx(np.abs(delta).max(), rel=1e-12)
    assert d["l2_diff"] == pytest.approx(np.linalg.norm(delta), rel=1e-9)
    assert d["relative_change"] == pytest.approx(
        np.linalg.norm(delta) / np.linalg.norm(a), rel=1e-9
    )
    every = client.diff(model_name, v1.number, v2.number, all_tensors=True)["diffs"]
    assert [x["status"] for x in every].count("same") == 3
    out = cli(server, "diff", f"{model_name}@1", f"{model_name}@2")
    assert "1 of 4 tensors differ" in out and "hidden.weight" in out and "out.bias" not in out
    shown = json.loads(cli(server, "--json", "diff", f"{model_name}@1", f"{model_name}@2", "--all"))
    assert len(shown["diffs"]) == 4 and shown["changed"] == 1


def test_identical_versions_and_submodule_init(client, model_name):
    client.create_model(model_name, "mlp")
    v1 = client.initialize(model_name, "normal(0, 0.01)")
    same = client.diff(model_name, v1.number, v1.number)
    assert same["identical"] and same["diffs"] == [] and same["tensors"] == 4
    v2 = client.initialize(model_name, "zeros", module_path="out", note="reset the head")
    result = client.diff(model_name, v1.number, v2.number)
    changed = {d["name"] for d in result["diffs"]}  # normal() leaves biases 0: zeros keeps them
    assert "out.weight" in changed and changed <= {"out.weight", "out.bias"}
    weight = next(d for d in result["diffs"] if d["name"] == "out.weight")
    assert weight["relative_change"] == pytest.approx(1.0)  # b is 0: ||a - 0|| / ||a||
    assert v2.provenance == {"kind": "init", "scheme": "zeros", "module": "out", "seed": 0}
    assert v2.note == "reset the head" and v2.author == ""


def test_provenance_of_upload_patch_and_lazy_init(client, server, model_name, tmp_path):
    client.create_model(model_name, "mlp")
    path, _ = mlp_file(tmp_path)
    v1 = client.upload(model_name, str(path), note="from the notebook")
    assert v1.provenance == {
        "kind": "upload",
        "file": "weights.safetensors",
        "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    assert v1.note == "from the notebook"
    v2 = client.patch(model_name, "out.bias", 1.5, index="0")
    assert v2.provenance == {
        "kind": "patch",
        "param": "out.bias",
        "index": "0",
        "op": "set",
        "value": 1.5,
    }
    lazy = model_name + "-lazy"
    client.create_model(lazy, "mlp", config={"in_features": None})
    client.infer(lazy, np.zeros((2, 7), np.float32))
    (made,) = client.list_versions(lazy)
    assert made.origin == "lazy-init" and made.provenance["input_shape"] == [2, 7]
    listed = json.loads(cli(server, "--json", "versions", model_name))
    assert listed[0]["provenance"]["file"] == "weights.safetensors"
    assert listed[0]["note"] == "from the notebook"


def test_log_is_newest_first_with_aliases_and_parents(client, server, model_name, tmp_path):
    client.create_model(model_name, "mlp")
    client.initialize(model_name, "normal(0, 0.01)", note="first\nsecond line")
    client.patch(model_name, "out.bias", 1.0, index="0")
    client.set_alias(model_name, "production", 1)
    client.patch(model_name, "out.bias", 2.0, index="1", ref=1)
    log = json.loads(cli(server, "--json", "log", model_name))
    assert [e["number"] for e in log] == [3, 2, 1]
    assert [e["parent"] for e in log] == [1, 1, None]
    assert log[2]["aliases"] == ["production"] and log[2]["note"] == "first\nsecond line"
    assert log[0]["provenance"]["kind"] == "patch"
    text_log = cli(server, "log", model_name)
    assert text_log.index("version 3") < text_log.index("version 2") < text_log.index("version 1")
    assert "version 1 (production): init" in text_log and "    second line" in text_log
    chain = json.loads(cli(server, "--json", "log", f"{model_name}@3"))
    assert [e["number"] for e in chain] == [3, 1]  # 2 is not an ancestor of 3


def test_author_is_the_token_name(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-alice-1 name=alice\ntok-bob-22\ntok-read-3 read name=reader\n")
    srv = ServerProcess(tmp_path / "data", "--auth-token-file", str(tokens))
    try:
        with Client(srv.address, token="tok-alice-1") as client:
            client.create_model("m", "mlp")
            v1 = client.initialize("m", "normal(0, 0.01)")
            client.create_model("lazy", "mlp", config={"in_features": None})
            client.infer("lazy", np.zeros((1, 3), np.float32))  # lazy-init by alice's request
            (made,) = client.list_versions("lazy")
            assert (made.origin, made.author) == ("lazy-init", "alice")
        with Client(srv.address, token="tok-bob-22") as client:
            v2 = client.patch("m", "out.bias", 3.0, index="0", note="bob's")
        with Client(srv.address, token="tok-read-3") as client:
            assert client.diff("m", 1, 2)["changed"] == 1  # a read-only token may diff
        assert (v1.author, v2.author) == ("alice", "token-2")
        log = json.loads(cli(srv, "--json", "log", "m", token="tok-read-3"))
        assert [e["author"] for e in log] == ["token-2", "alice"]
    finally:
        srv.stop()


class CountingBlobs:
    """The store's blobs, every ranged read counted; whole-blob opens refused."""

    def __init__(self, blobs):
        self.blobs, self.reads, self.largest = blobs, 0, 0

    def path(self, sha):
        return self.blobs.path(sha)

    def open(self, sha):
        raise AssertionError("a diff must not read a blob whole")

    def open_raw(self, sha):
        outer, raw = self, self.blobs.open_raw(sha)

        class Counted:
            size_bytes = getattr(raw, "size_bytes", None)

            def __enter__(self):
                raw.__enter__()
                return self

            def __exit__(self, *exc):
                return raw.__exit__(*exc)

            def seek(self, *a):
                return raw.seek(*a)

            def fileno(self):
                return raw.fileno()

            def read(self, n=-1):
                data = raw.read(n)
                outer.reads += len(data)
                outer.largest = max(outer.largest, len(data))
                return data

            def readinto(self, buffer):
                got = raw.readinto(buffer)
                outer.reads += got
                outer.largest = max(outer.largest, got)
                return got

        return Counted()


def test_diff_reads_only_changed_tensors_in_chunks(store):
    store.create_model("m", "mlp")
    v1 = store.initialize("m", "normal(0, 0.01)")
    v2 = store.patch("m", "hidden.weight", 2.0, op="mul")
    counting = CountingBlobs(store.blobs)
    result = diff_versions(counting, v1, v2, chunk_bytes=4096)
    (d,) = result.diffs
    assert d.name == "hidden.weight" and d.changed_elements == 256 * 20
    a = store.tensor("m", "hidden.weight", 1).double()
    assert d.l2_diff == pytest.approx(float(a.norm()), rel=1e-9)  # 2a - a = a
    tensor_bytes = 256 * 20 * 4
    header_bytes = 2 * 8 * 1024  # generous: two headers
    assert 2 * tensor_bytes <= counting.reads <= 2 * tensor_bytes + header_bytes
    assert counting.largest <= max(4096, 8192)  # chunks (and a header read), never a tensor


def test_upgrade_from_0003_keeps_versions_with_empty_provenance(tmp_path):
    for url_maker in ("sqlite", "postgresql"):
        data = tmp_path / url_maker
        data.mkdir()
        if url_maker == "sqlite":
            check_upgrade(f"sqlite:///{data / 'registry.db'}", data)
        else:
            with fresh_postgres_database() as url:
                check_upgrade(url, data)


def check_upgrade(url, data_dir):
    config = alembic_config(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0003")
        conn.execute(
            text(
                "INSERT INTO models (id, name, architecture, config, init, seed, description, "
                "next_version, created_at) VALUES (1, 'old', 'small_mlp', '{}', 'default', 0, '', "
                "2, CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO versions (model_id, number, sha256, size_bytes, manifest, origin, "
                "parent, created_at) VALUES (1, 1, :sha, 10, '[]', 'upload', NULL, "
                "CURRENT_TIMESTAMP)"
            ),
            {"sha": "0" * 64},
        )
    engine.dispose()
    result = subprocess.run(
        [sys.executable, "-m", "paramserve.service.cli", "db", "upgrade", "--registry-url", url],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    with Store(url, data_dir=data_dir) as store:
        (v,) = store.list_versions("old")
        assert (v.number, v.origin, v.provenance, v.note, v.author) == (1, "upload", {}, "", "")
        assert v.optimizer_sha256 is None
