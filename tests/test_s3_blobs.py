"""Blobs in S3-compatible object storage (``--blob-url s3://BUCKET/PREFIX``), on a real
SeaweedFS on loopback (tests/seaweed.py): the store in-process and a real server.

Each test has its own key prefix in the module's bucket; the test that stops the object store
restarts it before it ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest
import torch
from conftest import ServerProcess, fresh_postgres_database, reference_module, wait_for
from test_blob_races import (
    UPLOADERS,
    after_a_while,
    assert_clean,
    race_deletes_with_uploads,
    run_together,
    state,
)

from paramserve.protos import registry_pb2 as rpb
from paramserve.registry import Store
from paramserve.registry.check import check
from paramserve.registry.errors import DataLoss, Unavailable
from paramserve.registry.s3blobs import PART_BYTES
from paramserve.service.client import Client, ServerError
from paramserve.service.client_files import upload_path

BIG = {"in_features": 512, "hidden_features": 6000, "out_features": 10}  # ~12.5 MB: multipart


@pytest.fixture
def prefix() -> str:
    return "t-" + uuid.uuid4().hex[:10]


@pytest.fixture
def aws_env(seaweedfs, monkeypatch):
    for key, value in seaweedfs.env.items():
        monkeypatch.setenv(key, value)


def s3_store(seaweedfs, data_dir, prefix, url: str | None = None) -> Store:
    return Store(
        url,
        data_dir=data_dir,
        blob_url=seaweedfs.blob_url(prefix),
        s3_endpoint_url=seaweedfs.endpoint_url,
    )


@pytest.fixture
def store(seaweedfs, aws_env, tmp_path, prefix):
    with s3_store(seaweedfs, tmp_path / "data", prefix) as s:
        yield s


def keys(seaweedfs, prefix: str) -> list[str]:
    got = seaweedfs.client().list_objects_v2(Bucket=seaweedfs.bucket, Prefix=prefix + "/")
    return sorted(item["Key"] for item in got.get("Contents", []))


def unfinished_uploads(seaweedfs, prefix: str) -> list[str]:
    got = seaweedfs.client().list_multipart_uploads(Bucket=seaweedfs.bucket, Prefix=prefix + "/")
    return [u["Key"] for u in got.get("Uploads", [])]


def big_module(seed: int = 1) -> torch.nn.Module:
    from paramserve.registry import get_architecture

    return get_architecture("mlp").build(BIG, seed=seed).eval()


def corrupt(seaweedfs, key: str, at: int = -1) -> None:
    """Flip one byte of the object (same size), as bit rot or an operator's mistake would."""
    client = seaweedfs.client()
    data = bytearray(client.get_object(Bucket=seaweedfs.bucket, Key=key)["Body"].read())
    data[at] ^= 0xFF
    client.put_object(Bucket=seaweedfs.bucket, Key=key, Body=bytes(data))


# ---- the store in-process ----------------------------------------------------------------


def test_blobs_round_trip_under_content_addressed_keys(store, seaweedfs, prefix):
    store.create_model("big", "mlp", config=BIG)
    store.create_model("small", "small_mlp")
    module, small = big_module(), reference_module("small_mlp", False)
    assert sum(t.nbytes for t in module.state_dict().values()) > PART_BYTES  # multipart
    big_v = store.upload("big", module.state_dict())
    small_v = store.upload("small", small.state_dict())
    assert keys(seaweedfs, prefix) == sorted(
        f"{prefix}/sha256/{v.sha256[:2]}/{v.sha256}.safetensors" for v in (big_v, small_v)
    )
    assert unfinished_uploads(seaweedfs, prefix) == []  # no temp object, no open upload
    x = torch.randn(3, 512)
    assert torch.equal(store.load("big")(x), module(x))
    got = store.state_dict("small")
    assert all(torch.equal(got[k], v) for k, v in small.state_dict().items())
    # The same bytes again: the same key, nothing new.
    assert store.upload("big", module.state_dict()).sha256 == big_v.sha256
    assert len(keys(seaweedfs, prefix)) == 2 and check(store).ok


def test_a_parameter_query_reads_only_the_header_and_that_tensor(store):
    store.create_model("big", "mlp", config=BIG)
    module = big_module()
    version = store.upload("big", module.state_dict())
    name = list(module.state_dict())[-1]  # the last layer's bias: 10 floats
    before = store.blobs.bytes_fetched
    tensor = store.tensor("big", name)
    fetched = store.blobs.bytes_fetched - before
    assert torch.equal(tensor, module.state_dict()[name])
    header_bytes = 8 + 4096  # generously: this header is well under 4 KiB
    assert tensor.nbytes < fetched <= tensor.nbytes + header_bytes, (fetched, version.size_bytes)


def test_a_corrupt_object_is_data_loss(store, seaweedfs, prefix):
    store.create_model("m", "small_mlp")
    version = store.upload("m", reference_module("small_mlp", False).state_dict())
    key = store.blobs.key(version.sha256)
    corrupt(seaweedfs, key)  # the last byte: the last tensor's data
    with pytest.raises(DataLoss, match="corrupt"):
        store.load("m")
    with pytest.raises(DataLoss):
        for entry in version.manifest:  # the ranged read of the damaged tensor fails too
            store.tensor("m", entry.name)
    report = check(store)
    assert not report.ok and report.corrupt_blobs == [f"m@1 {version.sha256}"], report
    # Never overwritten, not even by the same bytes uploaded again: it stays until an operator
    # deletes it (then the next upload of those bytes puts it back).
    store.upload("m", reference_module("small_mlp", False).state_dict())
    with pytest.raises(DataLoss):
        store.load("m")
    seaweedfs.client().delete_object(Bucket=seaweedfs.bucket, Key=key)
    store.upload("m", reference_module("small_mlp", False).state_dict())
    store.load("m")


def test_a_blob_over_the_copy_limit_is_copied_in_parts(store, seaweedfs, prefix, monkeypatch):
    """Past CopyObject's 5 GiB a blob is copied part by part (UploadPartCopy), completed
    conditionally: the same path, limits made small."""
    from paramserve.registry import s3write

    monkeypatch.setattr(s3write, "MAX_COPY_BYTES", 1 << 20)
    monkeypatch.setattr(s3write, "COPY_PART_BYTES", 5 << 20)  # S3's smallest part
    store.create_model("big", "mlp", config=BIG)
    module = big_module(seed=4)
    version = store.upload("big", module.state_dict())
    assert version.size_bytes > 2 * (5 << 20)  # three parts
    assert keys(seaweedfs, prefix) == [store.blobs.key(version.sha256)]
    assert unfinished_uploads(seaweedfs, prefix) == []
    store.blobs.verify(version.sha256)
    assert store.upload("big", module.state_dict()).sha256 == version.sha256  # exists: kept


class NoConditionalWrites:
    """A client of a store that does not support ``If-None-Match`` on writes (501)."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        call = getattr(self._client, name)

        def refusing(**kwargs):
            if "IfNoneMatch" in kwargs:
                from botocore.exceptions import ClientError

                error = {"Code": "NotImplemented", "Message": "conditional writes"}
                raise ClientError(
                    {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 501}}, name
                )
            return call(**kwargs)

        return (
            refusing if name in ("put_object", "copy_object", "complete_multipart_upload") else call
        )


def test_a_store_without_conditional_writes_looks_before_it_writes(store, seaweedfs, prefix):
    """501 for If-None-Match: the writer looks (HEAD) and writes only when the key is free;
    an existing object is still not overwritten."""
    store.blobs.client = NoConditionalWrites(store.blobs.client)
    store.create_model("small", "small_mlp")
    store.create_model("big", "mlp", config=BIG)
    small = store.upload("small", reference_module("small_mlp", False).state_dict())
    big = store.upload("big", big_module(seed=6).state_dict())
    assert keys(seaweedfs, prefix) == sorted(store.blobs.key(v.sha256) for v in (small, big))
    corrupt(seaweedfs, store.blobs.key(small.sha256))
    store.upload("small", reference_module("small_mlp", False).state_dict())
    with pytest.raises(DataLoss):  # the damaged object was left as it was: not overwritten
        store.state_dict("small")


def test_boto3_is_imported_only_for_an_s3_url(tmp_path):
    code = (
        "import sys; from paramserve.registry import Store; import paramserve.service.cli; "
        f"Store(data_dir={str(tmp_path)!r}).close(); "
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_failed_write_leaves_no_object_and_no_multipart_upload(store, seaweedfs, prefix):
    def fail_after_two_parts(writer):
        writer.write(os.urandom(2 * PART_BYTES + 100))
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError, match="producer"):
        store.blobs.write(fail_after_two_parts)
    assert keys(seaweedfs, prefix) == [] and unfinished_uploads(seaweedfs, prefix) == []


def test_check_repair_removes_what_a_killed_writer_left(store, seaweedfs, prefix):
    writer = store.blobs.create()
    writer.write(os.urandom(PART_BYTES + 1))  # one part up; then the writer "dies"
    assert unfinished_uploads(seaweedfs, prefix) == [writer.temp_key]
    report = check(store)
    assert (
        report.ok and len(report.temp_files) == 1 and "unfinished multipart" in report.temp_files[0]
    )
    assert store.blobs.cleanup() == []  # the server's start: only an hour-old one goes
    assert check(store, repair=True).removed == []  # younger than --min-age-s
    report = check(store, repair=True, min_age_s=0)
    assert report.removed == report.temp_files and len(report.removed) == 1
    assert unfinished_uploads(seaweedfs, prefix) == [] and keys(seaweedfs, prefix) == []


def test_repair_removes_orphans_and_keeps_a_blob_an_upload_holds(store):
    """An orphan object is removed by check --repair; one that an upload holds (its object
    placed, its row not yet committed) is kept (the ordering of gc, on S3)."""
    store.create_model("m", "small_mlp")
    weights = reference_module("small_mlp", False).state_dict()
    first = store.upload("m", weights)
    store.delete_version("m", 1)
    assert not store.blobs.exists(first.sha256)  # collected at once
    commit, reports = store.blobs.commit, []

    def commit_then_repair(writer):
        blob = commit(writer)
        reports.append(check(store, repair=True, min_age_s=0))
        return blob

    store.blobs.commit = commit_then_repair
    version = store.upload("m", weights)
    store.blobs.commit = commit
    assert reports[0].removed == [] and reports[0].held_blobs == [store.blobs.path(first.sha256)]
    assert store.blobs.exists(version.sha256) and check(store).ok
    # An orphan: an object with no version row and no hold.
    store.repository.add_hold(version.sha256)
    store.delete_version("m", version.number)
    assert store.blobs.exists(version.sha256)  # held
    report = check(store, repair=True, stale_hold_s=0)
    assert report.removed == [store.blobs.path(version.sha256)]
    assert not store.blobs.exists(version.sha256) and check(store).orphan_blobs == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_deletes_and_repairs_race_uploads_of_the_same_bytes_from_two_stores(
    seaweedfs, aws_env, tmp_path, prefix, backend
):
    """Two stores (two replicas: two connection pools) on one registry and one bucket
    prefix: deletes and repairs on one while uploads of the same bytes go through the other;
    no row outlives its blob."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_postgres_database()) if backend == "postgresql" else None
        deleter = stack.enter_context(s3_store(seaweedfs, tmp_path, prefix, url))
        uploader = stack.enter_context(s3_store(seaweedfs, tmp_path, prefix, url))
        uploader.create_model("m", "small_mlp")
        weights = state(seed=3)
        started = uploader.upload("m", weights)
        t0 = time.perf_counter()
        uploader.upload("m", weights)
        span_s = time.perf_counter() - t0
        uploader.delete_version("m", 2)
        race_deletes_with_uploads(uploader, deleter, "m", weights, span_s, 10, store=deleter)
        data = deleter.blobs.open_raw(started.sha256).read()
        for version in deleter.list_versions("m"):
            deleter.delete_version("m", version.number)
        for _ in range(10):  # test_blob_races' repair race, the orphan put in the bucket
            put_orphan(deleter, started.sha256, data)
            uploads = [lambda: uploader.upload("m", weights).number] * UPLOADERS
            _, *numbers = run_together(
                after_a_while(span_s, lambda: check(deleter, repair=True)), *uploads
            )
            assert_clean(deleter)
            for number in numbers:
                assert uploader.tensor("m", "0.bias", number).shape == (8,)
                uploader.delete_version("m", number)
        assert check(deleter).ok


def put_orphan(store: Store, sha: str, data: bytes) -> None:
    """The object of ``sha`` with no version row (what a crash between them leaves)."""
    store.blobs.client.put_object(Bucket=store.blobs.bucket, Key=store.blobs.key(sha), Body=data)


# ---- a real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server(seaweedfs, tmp_path_factory):
    prefix = "srv-" + uuid.uuid4().hex[:8]
    srv = ServerProcess(
        tmp_path_factory.mktemp("s3server") / "data",
        *seaweedfs.server_args(prefix),
        "--stream-idle-timeout-s",
        "60",
        env=seaweedfs.env,
    )
    srv.prefix = prefix
    yield srv
    srv.stop()


def canonical_bytes(module: torch.nn.Module) -> bytes:
    with upload_path(module.state_dict()) as (path, _):
        return path.read_bytes()


def upload_stream(name: str, data: bytes, during=None, at: int = 0, declare: bool = False):
    """An UploadVersion stream of ``data`` in 1 MiB chunks, the sha256 in a trailer (or, with
    ``declare``, in the header); ``during()`` runs once ``at`` bytes are sent."""
    sha = hashlib.sha256(data).hexdigest()
    header = rpb.UploadHeader(model=name, size_bytes=len(data), sha256=sha if declare else "")
    yield rpb.UploadChunk(header=header)
    for begin in range(0, len(data), 1 << 20):
        if during is not None and begin >= at:
            during()
            during = None
        yield rpb.UploadChunk(data=data[begin : begin + (1 << 20)])
    if not declare:
        yield rpb.UploadChunk(trailer=rpb.UploadTrailer(sha256=sha))


def test_upload_and_download_through_a_server(s3_server, seaweedfs, tmp_path):
    module = big_module(seed=5)
    with Client(s3_server.address, timeout_s=120) as client:
        client.create_model("s3-big", "mlp", config=BIG)
        version = client.upload("s3-big", module.state_dict())
        path = tmp_path / "down.safetensors"
        client.download("s3-big", path=path, as_stored=True)
        assert path.read_bytes() == canonical_bytes(module)
        x = torch.randn(4, 512)
        assert (client.infer("s3-big", x) - module(x)).abs().max() <= 1e-5
        name = list(module.state_dict())[-1]
        assert torch.equal(
            torch.from_numpy(client.tensor("s3-big", name)), module.state_dict()[name]
        )
    key = f"{s3_server.prefix}/sha256/{version.sha256[:2]}/{version.sha256}.safetensors"
    assert key in keys(seaweedfs, s3_server.prefix)
    assert unfinished_uploads(seaweedfs, s3_server.prefix) == []


def test_a_corrupt_object_is_data_loss_through_a_server(s3_server, seaweedfs):
    module = reference_module("small_mlp", False, seed=7)
    with Client(s3_server.address) as client:
        client.create_model("s3-rot", "small_mlp")
        version = client.upload("s3-rot", module.state_dict())
        corrupt(
            seaweedfs,
            f"{s3_server.prefix}/sha256/{version.sha256[:2]}/{version.sha256}.safetensors",
        )
        with pytest.raises(DataLoss, match="corrupt"):
            client.state_dict("s3-rot")
        client.delete_model("s3-rot")  # its blob collected: the server's store is sound again


def test_a_cancelled_upload_leaves_no_multipart_upload(s3_server, seaweedfs):
    data = canonical_bytes(big_module(seed=8))
    release = threading.Event()
    with Client(s3_server.address) as client:
        client.create_model("s3-cancel", "mlp", config=BIG)
        call = client.registry.UploadVersion.future(
            upload_stream(
                "s3-cancel", data, during=lambda: release.wait(60), at=PART_BYTES + (2 << 20)
            )
        )
        assert wait_for(lambda: unfinished_uploads(seaweedfs, s3_server.prefix), 30)
        call.cancel()
        release.set()
        assert wait_for(lambda: not unfinished_uploads(seaweedfs, s3_server.prefix), 30)
        assert client.list_versions("s3-cancel") == []
    assert not [k for k in keys(seaweedfs, s3_server.prefix) if "/tmp/" in k]


def test_a_declared_sha256_streams_straight_to_its_key(s3_server, seaweedfs):
    """With the sha256 in the upload header the multipart upload goes to the blob's own key
    (completed once the streamed hash matches): no temp object, no server-side copy."""
    data = canonical_bytes(big_module(seed=10))
    sha = hashlib.sha256(data).hexdigest()
    final = f"{s3_server.prefix}/sha256/{sha[:2]}/{sha}.safetensors"
    release = threading.Event()
    with Client(s3_server.address) as client:
        client.create_model("s3-declared", "mlp", config=BIG)
        call = client.registry.UploadVersion.future(
            upload_stream(
                "s3-declared",
                data,
                during=lambda: release.wait(60),
                at=PART_BYTES + (2 << 20),
                declare=True,
            )
        )
        try:
            assert wait_for(lambda: unfinished_uploads(seaweedfs, s3_server.prefix), 30) == [final]
            assert final not in keys(seaweedfs, s3_server.prefix)  # not visible until complete
        finally:
            release.set()
        assert call.result(timeout=120).sha256 == sha
    assert final in keys(seaweedfs, s3_server.prefix)
    assert unfinished_uploads(seaweedfs, s3_server.prefix) == []
    assert not [k for k in keys(seaweedfs, s3_server.prefix) if "/tmp/" in k]


def test_paramserve_check_on_s3(s3_server, seaweedfs):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "paramserve.service.cli",
            "check",
            "--data-dir",
            str(s3_server.data_dir),
            *seaweedfs.server_args(s3_server.prefix),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **seaweedfs.env},
    )
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"] and report["versions_checked"] >= 1, result


def test_object_store_stopped_mid_upload_is_unavailable_then_service_resumes(
    s3_server, seaweedfs, aws_env
):
    """Last: it stops the module's object store (and starts it again). While it is down an
    upload and a download are UNAVAILABLE naming it, nothing is committed, and a version can
    still be deleted (its blob left as an orphan for check --repair)."""
    data = canonical_bytes(big_module(seed=9))
    with Client(s3_server.address, timeout_s=120) as client:
        client.create_model("s3-outage", "mlp", config=BIG)
        client.create_model("s3-outage-old", "small_mlp")
        old = client.upload("s3-outage-old", reference_module("small_mlp", False).state_dict())
        try:
            with pytest.raises(grpc.RpcError) as info:
                client.registry.UploadVersion(
                    upload_stream("s3-outage", data, during=seaweedfs.stop, at=3 << 20), timeout=120
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            details = info.value.details()
            assert seaweedfs.endpoint_url in details and "nothing was committed" in details
            assert client.list_versions("s3-outage") == []
            with pytest.raises(ServerError) as down:
                client.state_dict("s3-outage-old")
            assert down.value.code == grpc.StatusCode.UNAVAILABLE
            assert seaweedfs.endpoint_url in str(down.value)
            client.delete_version("s3-outage-old", old.number)
        finally:
            seaweedfs.start()
        version = client.upload("s3-outage", big_module(seed=9).state_dict())
        assert version.number == 1
    with Store(
        data_dir=s3_server.data_dir,
        blob_url=seaweedfs.blob_url(s3_server.prefix),
        s3_endpoint_url=seaweedfs.endpoint_url,
    ) as store:
        report = check(store)
        assert report.ok and store.blobs.path(old.sha256) in report.orphan_blobs, report
        repaired = check(store, repair=True, min_age_s=0)
        assert store.blobs.path(old.sha256) in repaired.removed
        assert unfinished_uploads(seaweedfs, s3_server.prefix) == []
        assert check(store).temp_files == []


def test_an_unreachable_object_store_is_unavailable_at_start(aws_env, tmp_path):
    from seaweed import free_ports

    (port,) = free_ports(1)
    with pytest.raises(Unavailable, match=f"127.0.0.1:{port}.*unreachable"):
        Store(
            data_dir=tmp_path, blob_url="s3://nowhere/p", s3_endpoint_url=f"http://127.0.0.1:{port}"
        )
