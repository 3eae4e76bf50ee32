"""Uploads over gRPC, one pass: the client checksums while it sends (a CRC32C in a trailer;
the server computes the sha256), the server writes canonical safetensors straight into the
blob; older streams (sha256 in the header, or in a trailer) still work; every broken stream
leaves no version, no blob and no temp file."""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading

import google_crc32c
import grpc
import pytest
import torch

from paramserve.protos import registry_pb2 as pb
from paramserve.protos import registry_pb2_grpc
from paramserve.registry import get_architecture
from paramserve.registry.tensorfile import write_tensors

from conftest import files_under, reference_module, wait_for

BIG = {"hidden": 40_000}  # sequential_mlp at ~3.7 MiB: several 1 MiB chunks


def canonical_file(path, state: dict):
    with open(path, "wb") as f:
        write_tensors(f, list(state.items()))
    return path


def big_state(seed: int = 1) -> dict:
    return get_architecture("sequential_mlp").build(BIG, seed=seed).state_dict()


def chunks(data: bytes, size: int = 1 << 20) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def stream(model: str, data: bytes, header_sha: str = "", trailer_sha: str | None = None,
           size: int | None = None, tail: tuple = (), crc: int | None = None) -> list:
    head = pb.UploadHeader(model=model, sha256=header_sha,
                           size_bytes=len(data) if size is None else size)
    out = [pb.UploadChunk(header=head)] + [pb.UploadChunk(data=c) for c in chunks(data)]
    if trailer_sha is not None or crc is not None:
        trailer = pb.UploadTrailer(sha256=trailer_sha or "")
        if crc is not None:
            trailer.crc32c = crc
        out.append(pb.UploadChunk(trailer=trailer))
    return out + list(tail)


def leftovers(server) -> list:
    """Temp files of uploads: the blob store's tmp dir and the spool."""
    return files_under(server.data_dir / "blobs" / "tmp") + files_under(server.data_dir / "spool")


def blobs(server) -> set:
    return set(files_under(server.data_dir / "blobs" / "sha256"))


@pytest.fixture
def stub(client):
    return registry_pb2_grpc.RegistryStub(client.channel)


def test_a_canonical_upload_is_stored_as_sent_with_progress(client, model_name, tmp_path,
                                                            server):
    client.create_model(model_name, "sequential_mlp", BIG)
    path = canonical_file(tmp_path / "big.safetensors", big_state())
    data = path.read_bytes()
    seen = []
    version = client.upload(model_name, path, progress=lambda done, total: seen.append(
        (done, total)))
    assert version.sha256 == hashlib.sha256(data).hexdigest()  # no rewrite: the blob is the file
    assert len(seen) >= 3 and seen[-1] == (len(data), len(data))
    again = client.upload(model_name, path)
    assert (again.number, again.sha256) == (2, version.sha256)  # one blob, two versions
    assert sum(p.name.startswith(version.sha256) for p in blobs(server)) == 1
    client.download(model_name, 2, tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == data
    x = torch.rand(2, 20)
    module = get_architecture("sequential_mlp").build(BIG, seed=1)
    assert torch.allclose(client.infer(model_name, x), module(x), atol=1e-5)
    assert leftovers(server) == []


def test_old_style_streams_and_both_sha256s_still_work(client, model_name, stub):
    client.create_model(model_name, "small_mlp")
    state = reference_module("small_mlp", False).state_dict()
    buffer = io.BytesIO()
    write_tensors(buffer, list(state.items()))
    data = buffer.getvalue()
    good = hashlib.sha256(data).hexdigest()
    old = stub.UploadVersion(iter(stream(model_name, data, header_sha=good)))
    both = stub.UploadVersion(iter(stream(model_name, data, header_sha=good,
                                          trailer_sha=good.upper())))
    new = stub.UploadVersion(iter(stream(model_name, data, trailer_sha=good)))
    assert [old.number, both.number, new.number] == [1, 2, 3]
    assert old.sha256 == both.sha256 == new.sha256 == good


def test_the_client_sends_a_crc32c_and_leaves_the_sha256_to_the_server(client, model_name,
                                                                        stub, tmp_path):
    client.create_model(model_name, "sequential_mlp", BIG)
    path = canonical_file(tmp_path / "big.safetensors", big_state())
    data = path.read_bytes()
    sent = []
    real = stub.UploadVersion

    def spy(messages, *args, **kwargs):
        messages = list(messages)
        sent.extend(messages)
        return real(iter(messages), *args, **kwargs)

    client.registry.UploadVersion = spy  # the client's own stream, as it goes on the wire
    version = client.upload(model_name, path)
    head, trailer = sent[0].header, sent[-1].trailer
    assert head.sha256 == "" and trailer.sha256 == ""
    assert trailer.HasField("crc32c") and trailer.crc32c == google_crc32c.value(data)
    assert version.sha256 == hashlib.sha256(data).hexdigest()
    crc = google_crc32c.value(data)  # a crc32c beside a sha256: both checked
    both = stub.UploadVersion(iter(stream(model_name, data, trailer_sha=version.sha256, crc=crc)))
    header_and_crc = stub.UploadVersion(iter(stream(model_name, data, header_sha=version.sha256,
                                                    crc=crc)))
    assert both.sha256 == header_and_crc.sha256 == version.sha256


def test_non_canonical_uploads_with_a_trailer_are_rewritten(client, model_name, stub):
    from safetensors.torch import save as st_save

    client.create_model(model_name, "tied_mlp")
    state = reference_module("tied_mlp", False).state_dict()
    stored = client.upload(model_name, state)  # tied entries given twice: spooled, rewritten
    for data in (st_save({k: v.clone() for k, v in state.items()}), _torch_saved(state)):
        version = stub.UploadVersion(iter(stream(model_name, data,
                                                 trailer_sha=hashlib.sha256(data).hexdigest())))
        assert version.sha256 == stored.sha256 != hashlib.sha256(data).hexdigest()
    downloaded = client.state_dict(model_name)
    assert downloaded["4.weight"] is downloaded["2.weight"]


def _torch_saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("canonical", [True, False], ids=["canonical", "spooled"])
def test_streams_that_lie_are_refused_and_leave_nothing(client, model_name, stub, server,
                                                        canonical):
    client.create_model(model_name, "sequential_mlp", BIG)
    state = big_state()
    data = write_and_read(state) if canonical else _torch_saved(state)
    good = hashlib.sha256(data).hexdigest()
    trailer = pb.UploadChunk(trailer=pb.UploadTrailer(sha256=good))
    before = blobs(server)
    cases = [
        (stream(model_name, data, trailer_sha="0" * 64), "damaged in transit"),
        (stream(model_name, data, crc=google_crc32c.value(data) ^ 1), "damaged in transit"),
        (stream(model_name, data, trailer_sha=good, crc=google_crc32c.value(data) ^ 1),
         "crc32c is"),
        (stream(model_name, data, trailer_sha="xyz"), "64-hex-digit"),
        (stream(model_name, data, header_sha=good, trailer_sha="1" * 64), "differs from"),
        (stream(model_name, data), "no sha256"),
        (stream(model_name, data, trailer_sha=good, tail=[pb.UploadChunk(data=b"x")]),
         "after its trailer"),
        (stream(model_name, data, trailer_sha=good, tail=[trailer]), "after its trailer"),
        (stream(model_name, data, trailer_sha=good, size=len(data) + 1), "ended after"),
        (stream(model_name, data, trailer_sha=good, size=len(data) - 1), "more than"),
        (stream(model_name, data[:-10], trailer_sha=good, size=len(data)), "ended after"),
    ]
    for messages, fragment in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadVersion(iter(messages), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fragment
        assert fragment in info.value.details()
        assert wait_for(lambda: leftovers(server) == []), fragment
    assert client.list_versions(model_name) == [] and blobs(server) == before


def write_and_read(state: dict) -> bytes:
    buffer = io.BytesIO()
    write_tensors(buffer, list(state.items()))
    return buffer.getvalue()


class HeldStream:
    """A request stream that sends ``first`` messages, then waits until released."""

    def __init__(self, first: list, rest: list):
        self.first, self.rest = first, rest
        self.sent_first, self.release = threading.Event(), threading.Event()

    def __iter__(self):
        yield from self.first
        self.sent_first.set()
        self.release.wait(60)
        yield from self.rest


def test_a_state_dict_that_cannot_fit_is_refused_at_its_header(client, model_name, server):
    client.create_model(model_name, "sequential_mlp", BIG)
    wrong = get_architecture("sequential_mlp").build({"hidden": 40_001}).state_dict()
    messages = stream(model_name, write_and_read(wrong), trailer_sha="0" * 64)

    async def send_the_start_only():
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = registry_pb2_grpc.RegistryStub(channel).UploadVersion(timeout=60)
            for message in messages[:2]:  # the header and the first MiB of a 3.7 MiB file
                await call.write(message)
            return await asyncio.wait_for(call.code(), 30), await call.details()

    code, details = asyncio.run(send_the_start_only())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected F32[40000, 20], given F32[40001, 20]" in details
    assert wait_for(lambda: leftovers(server) == [])
    assert client.list_versions(model_name) == []


def test_a_pickled_model_is_refused_at_its_first_chunk(client, model_name, server):
    """Any client, ours or not: torch.save writes its pickle before the tensors."""
    client.create_model(model_name, "sequential_mlp", BIG)
    buffer = io.BytesIO()
    torch.save(get_architecture("sequential_mlp").build(BIG), buffer)  # the module itself
    messages = stream(model_name, buffer.getvalue(), trailer_sha="0" * 64)

    async def send_the_start_only():
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = registry_pb2_grpc.RegistryStub(channel).UploadVersion(timeout=60)
            for message in messages[:2]:  # the header and the first MiB of a 3.7 MiB file
                await call.write(message)
            return await asyncio.wait_for(call.code(), 30), await call.details()

    code, details = asyncio.run(send_the_start_only())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "pickles 'torch.nn.modules.container.Sequential'" in details
    assert "weights_only" in details and "model.state_dict()" in details
    assert wait_for(lambda: leftovers(server) == [])
    assert client.list_versions(model_name) == []


@pytest.mark.parametrize("canonical", [True, False], ids=["canonical", "spooled"])
def test_a_cancelled_upload_leaves_nothing(client, model_name, stub, server, canonical):
    client.create_model(model_name, "sequential_mlp", BIG)
    state = big_state()
    data = write_and_read(state) if canonical else _torch_saved(state)
    messages = stream(model_name, data, trailer_sha=hashlib.sha256(data).hexdigest())
    held = HeldStream(messages[:3], messages[3:])
    before = blobs(server)
    call = stub.UploadVersion.future(iter(held), timeout=60)
    try:
        assert held.sent_first.wait(30)
        assert wait_for(lambda: leftovers(server) != [])  # the server is writing it
        call.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            call.result(timeout=30)
    finally:
        held.release.set()
    assert wait_for(lambda: leftovers(server) == [])
    assert client.list_versions(model_name) == [] and blobs(server) == before
