"""Streamed uploads in the core: canonical safetensors go straight into their blob, everything
else is spooled and rewritten; any failure leaves no row, no blob and no temp file."""

from __future__ import annotations

import hashlib
import io
import os

import google_crc32c
import pytest
import torch
from safetensors.torch import save as st_save

from paramserve.registry import FailedPrecondition, InvalidArgument, InvalidStateDict
from paramserve.registry import fileio, uploads
from paramserve.registry.tensorfile import write_tensors

from conftest import blob_files, files_under, reference_module


def canonical(state: dict) -> bytes:
    buffer = io.BytesIO()
    write_tensors(buffer, list(state.items()))
    return buffer.getvalue()


def torch_saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def metadata_too(state: dict) -> bytes:
    buffer = io.BytesIO()
    write_tensors(buffer, list(state.items()), {"format": "pt"})
    return buffer.getvalue()


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def stream(store, name: str, data: bytes, chunk: int = 1000, sha256: str | None = None,
           alias: str | None = None):
    upload = store.begin_upload(name, len(data), alias=alias)
    upload.write(chunked(data, chunk))
    return upload, upload.finish(sha256 or hashlib.sha256(data).hexdigest())


def assert_nothing_left(store, name: str = "m") -> None:
    assert store.list_versions(name) == []
    assert blob_files(store) == [] and files_under(store.data_dir / "spool") == []


@pytest.fixture
def mlp(store):
    store.create_model("m", "mlp")
    return store


def test_write_tensors_lays_out_any_order_canonically():
    state = reference_module("fixed_hidden_mlp", False).state_dict()
    backwards = dict(reversed(list(state.items())))
    assert canonical(state) == canonical(backwards)


def test_a_canonical_upload_goes_straight_into_its_blob(mlp):
    state = reference_module("mlp", False).state_dict()
    data = canonical(state)
    upload, version = stream(mlp, "m", data, chunk=5, alias="production")
    assert upload.direct and version.sha256 == hashlib.sha256(data).hexdigest()
    assert mlp.blobs.path(version.sha256).read_bytes() == data
    assert version.aliases == ("production",) and version.origin == "upload"
    assert [e.name for e in version.manifest] == list(state)  # as the module names them
    assert files_under(mlp.data_dir / "spool") == []


def test_the_store_own_blobs_are_canonical_tied_and_lazy_ones_too(store):
    for architecture, config in (("tied_mlp", {}), ("sequential_mlp", {"in_features": None})):
        store.create_model(architecture, architecture, config)
        lazy = bool(config)
        first = store.upload(architecture, reference_module(architecture, lazy).state_dict())
        data = store.blobs.path(first.sha256).read_bytes()
        upload, again = stream(store, architecture, data)
        assert upload.direct and again.sha256 == first.sha256 and again.number == 2
        assert again.manifest == first.manifest


@pytest.mark.parametrize("fmt", ["safetensors-library", "torch", "tied-twice", "metadata"])
def test_other_uploads_are_spooled_and_rewritten(store, fmt):
    architecture = "tied_mlp" if fmt == "tied-twice" else "mlp"
    state = reference_module(architecture, False).state_dict()
    data = {"safetensors-library": lambda: st_save({k: v.contiguous() for k, v in state.items()}),
            "torch": lambda: torch_saved(state),
            "tied-twice": lambda: canonical({k: v.clone() for k, v in state.items()}),
            "metadata": lambda: metadata_too(state)}[fmt]()
    store.create_model("m", architecture)
    upload, version = stream(store, "m", data, chunk=333)
    assert not upload.direct
    assert version.sha256 == store.upload("m", state).sha256  # the same canonical blob
    assert files_under(store.data_dir / "spool") == []


def test_the_safetensors_library_writes_the_same_data_but_another_header():
    state = reference_module("mlp", False).state_dict()
    theirs, ours = st_save(dict(state)), canonical(state)
    assert theirs != ours and theirs[-1000:] == ours[-1000:]


def test_a_header_over_the_peek_limit_is_spooled(mlp, monkeypatch):
    monkeypatch.setattr(uploads, "HEADER_PEEK_LIMIT", 64)
    upload, version = stream(mlp, "m", canonical(reference_module("mlp", False).state_dict()))
    assert not upload.direct and version.number == 1


def test_a_canonical_header_that_does_not_fit_is_refused_before_the_data(mlp):
    state = reference_module("mlp", False).state_dict()
    state["hidden.weight"] = torch.zeros(256, 21)
    data = canonical(state)
    upload = mlp.begin_upload("m", len(data))
    with pytest.raises(InvalidStateDict, match="expected F32\\[256, 20\\], given F32\\[256, 21\\]"):
        upload.write([data[:4096]])
    with pytest.raises(FailedPrecondition):
        upload.write([data[4096:]])
    assert_nothing_left(mlp)


@pytest.mark.parametrize("direct", [True, False])
def test_failures_leave_nothing_behind(mlp, direct):
    state = reference_module("mlp", False).state_dict()
    data = canonical(state) if direct else torch_saved(state)
    good = hashlib.sha256(data).hexdigest()
    with pytest.raises(InvalidArgument, match="damaged in transit"):
        stream(mlp, "m", data, sha256="0" * 64)
    upload = mlp.begin_upload("m", len(data) - 1)
    with pytest.raises(InvalidArgument, match="more than"):
        upload.write(chunked(data, 4096))
    upload = mlp.begin_upload("m", len(data) + 1)
    upload.write(chunked(data, 4096))
    with pytest.raises(InvalidArgument, match="ended after"):
        upload.finish(good)
    upload = mlp.begin_upload("m", len(data))
    upload.write(chunked(data[:len(data) // 2], 4096))
    assert files_under(mlp.data_dir) != []
    upload.abort()
    upload.abort()
    assert_nothing_left(mlp)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "spooled"])
def test_a_crc32c_checks_an_upload_whose_sha256_the_store_computes(mlp, direct):
    state = reference_module("mlp", False).state_dict()
    data = canonical(state) if direct else torch_saved(state)
    crc = google_crc32c.value(data)
    for bad, fragment in ((crc ^ 1, "crc32c is"), (None, "neither a sha256 nor a crc32c")):
        upload = mlp.begin_upload("m", len(data))
        upload.write(chunked(data, 4096))
        with pytest.raises(InvalidArgument, match=fragment):
            upload.finish(None, bad)
        assert_nothing_left(mlp)
    upload = mlp.begin_upload("m", len(data))
    upload.write(chunked(data, 4096))
    version = upload.finish(None, crc)
    assert version.provenance["file_sha256"] == hashlib.sha256(data).hexdigest()
    assert mlp.list_versions("m") == [version]


def test_a_bad_model_or_alias_is_refused_before_any_byte(store):
    from paramserve.registry import NotFound

    with pytest.raises(NotFound):
        store.begin_upload("absent", 10)
    store.create_model("m", "mlp")
    with pytest.raises(InvalidArgument, match="reserved"):
        store.begin_upload("m", 10, alias="latest")


def test_bytes_of_neither_format_are_refused_at_their_first_chunk(mlp):
    upload = mlp.begin_upload("m", 1 << 20)
    with pytest.raises(InvalidArgument, match="neither safetensors nor.*b'hello, n'"):
        upload.write([b"hello, not a state_dict"])
    assert upload.received < upload.size
    assert_nothing_left(mlp)


def test_a_pickled_model_is_refused_when_its_pickle_is_in_before_its_tensors(mlp):
    buffer = io.BytesIO()
    torch.save(reference_module("mlp", False), buffer)  # the module, not its state_dict
    data = buffer.getvalue()
    upload = mlp.begin_upload("m", len(data))
    with pytest.raises(InvalidArgument, match="builtin.MLP.*weights_only.*state_dict"):
        for chunk in chunked(data, 1000):
            upload.write([chunk])
    assert upload.received < 10_000 < len(data)  # ~22 kB of tensors were never sent
    assert_nothing_left(mlp)


def test_a_state_dict_pickle_streams_in_any_chunks_and_past_the_peek_limit(mlp, monkeypatch):
    state = reference_module("mlp", False).state_dict()
    data = torch_saved(state)
    for chunk in (7, 1000, len(data)):
        upload, version = stream(mlp, "m", data, chunk=chunk)
        assert not upload.direct and version.sha256 == mlp.upload("m", state).sha256
    monkeypatch.setattr(uploads, "PICKLE_PEEK_LIMIT", 64)  # the pickle is not in by then
    upload, version = stream(mlp, "m", data, chunk=16)
    assert version.sha256 == mlp.upload("m", state).sha256
    assert files_under(mlp.data_dir / "spool") == []


def test_an_empty_or_tiny_upload_gets_the_usual_error(mlp):
    for data in (b"", b"\x01\x02"):
        with pytest.raises(InvalidArgument, match="neither safetensors nor"):
            stream(mlp, "m", data)
    assert_nothing_left(mlp)


def test_hashing_writer_writes_back_behind_and_survives_short_writes(tmp_path, monkeypatch):
    real_writev = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, views: real_writev(fd, [views[0][:7]]))
    chunks = [os.urandom(n) for n in (0, 5, 100, 4096, 3)] * 20
    writer = fileio.HashingWriter(tmp_path / "f.partial", writeback=True)
    writer._writeback.step = 4096
    assert writer.write_many(chunks[:50]) + writer.write(b"".join(chunks[50:])) == \
        sum(map(len, chunks))
    writer.sync()
    data = (tmp_path / "f.partial").read_bytes()
    assert data == b"".join(chunks) and writer.sha256 == hashlib.sha256(data).hexdigest()


def test_a_download_reader_drops_the_pages_behind_it_and_still_checks(tmp_path, monkeypatch):
    from paramserve.registry import blobs

    data = os.urandom(10_000)
    blob_store = blobs.BlobStore(tmp_path)
    ref = blob_store.write(lambda w: w.write(data))
    advice = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, at, n, how: (
        advice.append((at, n, how)), real(fd, at, n, how)))
    monkeypatch.setattr(blobs, "WRITEBACK_STEP_BYTES", 4096)
    with blob_store.open(ref.sha256) as reader:
        reader.drop_behind()
        got = b"".join(iter(lambda: reader.read(1000), b""))
        reader.finish()
    assert got == data
    dropped = [(at, n) for at, n, how in advice if how == os.POSIX_FADV_DONTNEED]
    assert dropped == [(0, 5000), (5000, 5000)]  # each step once, behind the reader


def test_segments_hashed_beside_the_writer_match_one_pass(monkeypatch):
    monkeypatch.setattr(fileio, "PARALLEL_HASH_BYTES", 1000)
    data = os.urandom(50_000)
    segments = [("a", 100, 20_000), ("b", 20_000, 20_001), ("c", 30_000, 50_000)]
    hasher = fileio.StreamHasher(segments)
    pieces = [data[i:i + 3000] for i in range(0, len(data), 3000)]
    for i in range(0, len(pieces), 4):  # batches over the limit: segments in a helper thread
        assert hasher.update_many(pieces[i:i + 4]) == sum(map(len, pieces[i:i + 4]))
    assert hasher.sha256 == hashlib.sha256(data).hexdigest() and hasher.size == len(data)
    assert hasher.segment_sha256 == {n: hashlib.sha256(data[b:e]).hexdigest()
                                     for n, b, e in segments}

    def fail():
        raise OSError("disk")

    with pytest.raises(OSError, match="disk"):  # the helper is done before the error returns
        fileio.StreamHasher(segments).update_many([data], fail)
