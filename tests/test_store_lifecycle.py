"""The store under a long life: aliased deletes, refs and names that reach SQL, damaged blobs,
full disks, architectures another replica registered, bounded locks, and read-only queries
whose memory is that of what they return."""

from __future__ import annotations

import errno
import io
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import select, update

from paramserve.protos import inference_pb2 as ipb
from paramserve.protos import inference_pb2_grpc
from paramserve.registry import (DataLoss, FailedPrecondition, InvalidArgument, NotFound,
                                 ResourceExhausted, Store, architecture, get_architecture)
from paramserve.registry import architectures as architectures_module
from paramserve.registry import fileio, tensorfile
from paramserve.registry.check import check
from paramserve.registry.limits import Limits
from paramserve.registry.schema import VersionRow
from paramserve.service.client import Client

from conftest import ServerProcess, reference_module


def small_state(seed: int = 1) -> dict:
    return reference_module("small_mlp", False, seed=seed).state_dict()


# Every test that takes ``store`` runs on SQLite and on PostgreSQL (conftest.py): NUL bytes and
# 64-bit numbers are where the two differ.
pytestmark = pytest.mark.store_backends("sqlite", "postgresql")


# ---- deleting a version an alias points at -------------------------------------------------

def test_deleting_an_aliased_version_is_refused_naming_the_aliases_unless_forced(store):
    store.create_model("m", "small_mlp")
    store.upload("m", small_state(1), alias="production")
    store.set_alias("m", "canary", 1)
    store.upload("m", small_state(2))
    with pytest.raises(FailedPrecondition, match=r"\['canary', 'production'\].*--force"):
        store.delete_version("m", 1)
    assert store.resolve("m", "production").number == 1  # nothing changed
    assert store.delete_version("m", 1, force=True) == ["canary", "production"]
    assert store.get_model("m").aliases == {}
    assert store.delete_version("m", 2) == []
    assert check(store).ok


def test_deleting_an_aliased_version_through_the_server(client, model_name):
    client.create_model(model_name, "small_mlp")
    client.upload(model_name, small_state(), alias="production")
    with pytest.raises(FailedPrecondition, match="production"):
        client.delete_version(model_name, 1)
    assert client.get_model(model_name).aliases == {"production": 1}
    assert client.delete_version(model_name, 1, force=True) == ["production"]


# ---- refs, names and NUL bytes -------------------------------------------------------------

BAD_REFS = ["²", "٠١", "1" * 5000, "prod\x00", "prod\n", "x" * 300]


def test_refs_have_one_canonical_form_and_bad_ones_are_invalid(store):
    store.create_model("m", "small_mlp")
    store.upload("m", small_state(), alias="production")
    assert store.resolve("m", "01").number == 1 and store.resolve("m", 1).number == 1
    assert store.resolve("m", "latest").number == 1 and store.resolve("m", "").number == 1
    for ref in BAD_REFS:
        with pytest.raises(InvalidArgument):
            store.resolve("m", ref)
        with pytest.raises(InvalidArgument):
            store.tensor("m", "0.weight", ref)
    for number in (0, -1, 2**31, 2**63, 10**30):
        with pytest.raises(NotFound, match="no version"):
            store.resolve("m", number)
        with pytest.raises(NotFound):
            store.set_alias("m", "staging", number)
        with pytest.raises(NotFound):
            store.delete_version("m", number)


BAD_NAMES = ["m\n", "m\x00", "\x00", "a" * 129, "mé", " m", ""]


def test_names_are_checked_before_any_lookup_reaches_sql(store):
    store.create_model("m", "small_mlp")
    store.upload("m", small_state())
    for name in BAD_NAMES:
        for call in (lambda: store.create_model(name, "small_mlp"),
                     lambda: store.get_model(name), lambda: store.list_versions(name),
                     lambda: store.resolve(name), lambda: store.delete_model(name),
                     lambda: store.delete_version(name, 1), lambda: store.set_alias(name, "a", 1),
                     lambda: store.upload(name, small_state()),
                     lambda: store.parameters(name)):
            with pytest.raises(InvalidArgument, match="invalid"):
                call()
        if name:
            with pytest.raises(InvalidArgument):
                store.set_alias("m", name, 1)
            with pytest.raises(InvalidArgument):
                store.delete_alias("m", name)
    with pytest.raises(InvalidArgument, match="NUL"):
        store.create_model("d", "small_mlp", description="a\x00b")
    assert [m.name for m in store.list_models()] == ["m"]


REFS = st.one_of(st.none(), st.text(max_size=40),
                 st.text(alphabet="0123456789²٠١\x00\n-", max_size=40),
                 st.integers(min_value=-2**70, max_value=2**70))


def test_any_ref_or_name_is_found_not_found_or_invalid_never_a_driver_error(store):
    store.create_model("m", "small_mlp")
    store.upload("m", small_state(), alias="production")

    @settings(max_examples=120, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(name=st.one_of(st.just("m"), st.text(max_size=30)), ref=REFS)
    def probe(name, ref):
        for call in (lambda: store.resolve(name, ref), lambda: store.version_or_none(name, ref),
                     lambda: store.tensor(name, "0.bias", ref), lambda: store.get_model(name),
                     lambda: store.delete_alias("m", name) if name != "production" else None):
            try:
                call()
            except (InvalidArgument, NotFound):
                pass

    probe()
    assert store.resolve("m", "production").number == 1


def test_bad_refs_and_names_answer_invalid_argument_through_the_server(client, model_name):
    client.create_model(model_name, "small_mlp")
    client.upload(model_name, small_state())
    for ref in ["²", "٠١", "1" * 5000]:
        with pytest.raises(InvalidArgument):
            client.tensor(model_name, "0.weight", ref)
        with pytest.raises(InvalidArgument):
            client.infer(model_name, torch.ones(1, 4), ref=ref)
    with pytest.raises(InvalidArgument):
        client.create_model(model_name + "\n", "small_mlp")


# ---- bounds ----------------------------------------------------------------------------------

def test_a_description_over_the_limit_is_resource_exhausted(tmp_path):
    with Store(data_dir=tmp_path, limits=Limits(max_description_chars=10)) as store:
        assert store.limits.max_description_chars == 10
        with pytest.raises(ResourceExhausted, match="max-description-chars"):
            store.create_model("m", "small_mlp", description="x" * 11)
        store.create_model("m", "small_mlp", description="x" * 10)
        deep: dict = {}
        for _ in range(100):
            deep = {"a": deep}
        with pytest.raises(InvalidArgument, match="nested"):
            store.create_model("n", "small_mlp", config={"hidden": 8, "x": deep})


def test_first_version_locks_are_bounded_whatever_the_number_of_models(store):
    locks = {id(store.operations.first_version_lock(f"model-{i}")) for i in range(5000)}
    assert len(locks) <= 64
    assert store.operations.first_version_lock("a") is store.operations.first_version_lock("a")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_resource_exhausted_saying_where(store, monkeypatch, code):
    store.create_model("m", "small_mlp")
    state = small_state()
    torch_saved = io.BytesIO()
    torch.save(state, torch_saved)

    def full(fd, buffers):
        raise OSError(code, "No space left on device")

    monkeypatch.setattr(fileio, "write_all", full)
    with pytest.raises(ResourceExhausted, match=r"disk .*blobs") as blob_error:
        store.upload("m", state)
    assert "full" in str(blob_error.value) or "quota" in str(blob_error.value)
    upload = store.begin_upload("m", len(torch_saved.getvalue()))  # not safetensors: spooled
    with pytest.raises(ResourceExhausted, match="spool"):
        upload.write([torch_saved.getvalue()])
    monkeypatch.undo()
    assert store.list_versions("m") == []
    report = check(store)
    assert report.ok and report.temp_files == [] and report.orphan_blobs == []


# ---- damaged blobs ---------------------------------------------------------------------------

def test_a_truncated_blob_is_data_loss_naming_it(store):
    store.create_model("m", "small_mlp")
    version = store.upload("m", small_state())
    path = store.blobs.path(version.sha256)
    data = path.read_bytes()
    for cut in (len(data) - 3, 20, 4):
        path.write_bytes(data[:cut])
        for read in (lambda: store.load("m"), lambda: store.state_dict("m"),
                     lambda: store.tensor("m", "2.bias"),
                     lambda: store.parameters("m", stats=True),
                     lambda: store.patch("m", "2.bias", 1.0)):
            with pytest.raises(DataLoss, match=version.sha256):
                read()


def test_a_same_size_corrupt_blob_is_replaced_by_the_next_upload_of_its_bytes(store):
    store.create_model("m", "small_mlp")
    state = small_state()
    first = store.upload("m", state)
    path = store.blobs.path(first.sha256)
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataLoss):
        store.blobs.verify(first.sha256)
    second = store.upload("m", state)
    assert second.sha256 == first.sha256
    store.blobs.verify(second.sha256)  # healed: the fresh, hashed file replaced the damaged one
    assert torch.equal(store.state_dict("m", second.number)["2.bias"], state["2.bias"])
    assert check(store).ok


def test_a_ranged_tensor_read_is_checked_against_the_tensors_own_digest(store):
    store.create_model("m", "small_mlp")
    state = small_state()
    version = store.upload("m", state)
    assert all(e.sha256 and len(e.sha256) == 64 for e in version.manifest)
    assert torch.equal(store.tensor("m", "0.weight"), state["0.weight"])
    path = store.blobs.path(version.sha256)
    with open(path, "rb") as f:
        last = max(tensorfile.read_header(f).entries.values(), key=lambda e: e.end).name
    assert last != "0.weight"
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF  # inside the last tensor of the file
    path.write_bytes(bytes(data))
    with pytest.raises(DataLoss, match="sha256"):
        store.tensor("m", last)
    assert torch.equal(store.tensor("m", "0.weight"), state["0.weight"])  # its bytes are sound
    with pytest.raises(DataLoss):
        store.parameters("m", stats=True)
    # A version written before per-tensor digests: the whole blob is read and verified.
    with store.tx() as session:
        row = session.scalar(select(VersionRow))
        legacy = [{k: v for k, v in e.items() if k != "sha256"} for e in row.manifest]
        session.execute(update(VersionRow).values(manifest=legacy))
    assert all(e.sha256 is None for e in store.resolve("m").manifest)
    with pytest.raises(DataLoss, match=version.sha256):
        store.tensor("m", "0.weight")  # its own bytes are fine, the blob is not
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert torch.equal(store.tensor("m", "0.weight"), state["0.weight"])


def test_parameter_stats_and_tensors_match_the_module(store):
    module = reference_module("tied_mlp", True)
    store.create_model("t", "tied_mlp", {"in_features": None})
    store.upload("t", module.state_dict())
    infos = {p.name: p for p in store.parameters("t", stats=True)}
    for name, tensor in module.state_dict().items():
        values = tensor.double()
        stats = infos[name].stats
        assert stats.min == pytest.approx(values.min().item())
        assert stats.max == pytest.approx(values.max().item())
        assert stats.mean == pytest.approx(values.mean().item(), abs=1e-12)
        assert stats.std == pytest.approx(values.std().item() if values.numel() > 1 else 0.0)
        assert torch.equal(store.tensor("t", name), tensor)
    assert infos["4.weight"].tied_with == ("2.weight",) and infos["2.weight"].initialized
    assert store.tensor("t", "2.weight", index="0, :2").shape == (2,)
    with pytest.raises(NotFound, match="no entry"):
        store.tensor("t", "nope")


# ---- architectures this process does not know ----------------------------------------------

def test_models_of_an_unregistered_architecture_still_list_through_a_server(tmp_path):
    @architecture("only_in_this_test", defaults={"width": 3}, example_input_shape=(1, 3),
                  replace=True)
    def only_in_this_test(width: int):
        return torch.nn.Linear(width, 1)

    data_dir = tmp_path / "data"
    try:
        with Store(data_dir=data_dir) as store:
            store.create_model("foreign", "only_in_this_test")
            store.create_model("known", "small_mlp")
            store.upload("known", small_state())
    finally:
        architectures_module._ARCHITECTURES.pop("only_in_this_test", None)
    with Store(data_dir=data_dir) as store:  # this process no longer knows it either
        assert [m.name for m in store.list_models()] == ["foreign", "known"]
        assert store.get_model("foreign").architecture == "only_in_this_test"
        assert not store.get_model("foreign").lazy
    server = ServerProcess(data_dir)
    try:
        with Client(server.address, timeout_s=30) as client:
            listed = {m.name: m for m in client.list_models()}
            assert listed["foreign"].architecture == "only_in_this_test"
            assert client.get_model("foreign").architecture == "only_in_this_test"
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(client.channel)
            index = stub.RepositoryIndex(ipb.RepositoryIndexRequest(), timeout=30)
            assert {m.name for m in index.models} >= {"foreign", "known"}
            with pytest.raises(NotFound, match="only_in_this_test"):
                client.infer("foreign", torch.ones(1, 3))
            assert client.infer("known", torch.ones(1, 4)).shape == (1, 1)
    finally:
        server.stop()


# ---- memory of read-only queries -------------------------------------------------------------

PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    from paramserve.registry import Store

    def rss_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    def growth_kb(call):
        open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
        before = rss_kb("VmRSS")
        call()
        return rss_kb("VmHWM") - before

    store = Store(data_dir=sys.argv[1])
    for _ in range(2):  # warm up: imports, allocator pools, page cache of the small model
        store.parameters("small", stats=True); store.tensor("small", "2.bias")
    out = {"stats_kb": growth_kb(lambda: store.parameters("big", stats=True)),
           "tensor_kb": growth_kb(lambda: store.tensor("big", "2.bias")),
           "tree_kb": growth_kb(lambda: store.module_tree("big"))}
    print(json.dumps(out))
""")
BIG_HIDDEN = 774_000  # sequential_mlp 20→774000→10: 24M float32 parameters, 96 MB
PEAK_MARGIN_MB = 16   # a stats chunk (1 MB) in float64, torch's temporaries; the model is 96 MB


def test_parameter_stats_and_one_tensor_read_a_chunk_not_the_model(tmp_path):
    data_dir = tmp_path / "data"
    with Store(data_dir=data_dir) as store:
        store.create_model("small", "small_mlp")
        store.upload("small", small_state())
        config = {"hidden": BIG_HIDDEN}
        store.create_model("big", "sequential_mlp", config)
        store.upload("big", get_architecture("sequential_mlp").build(config, seed=0)
                     .state_dict())
        assert store.resolve("big").size_bytes > 90 << 20
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(data_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth = json.loads(result.stdout.strip().splitlines()[-1])
    assert growth["stats_kb"] < PEAK_MARGIN_MB << 10, growth
    assert growth["tensor_kb"] < PEAK_MARGIN_MB << 10, growth
    assert growth["tree_kb"] < PEAK_MARGIN_MB << 10, growth


def test_grpc_status_of_a_truncated_blob_is_data_loss(server, client, model_name):
    client.create_model(model_name, "small_mlp")
    version = client.upload(model_name, small_state())
    with Store(data_dir=server.data_dir) as store:
        path = store.blobs.path(version.sha256)
        path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataLoss, match=version.sha256):  # the client's DATA_LOSS
        client.tensor(model_name, "2.bias")
    with pytest.raises(DataLoss, match=version.sha256):
        client.parameters(model_name, stats=True)
