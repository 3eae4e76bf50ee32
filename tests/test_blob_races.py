"""Blob garbage collection against uploads of the same bytes: a version row never outlives its
blob, whatever the interleaving (threads, processes, a real server, SQLite and PostgreSQL).

The races: a DeleteVersion (or `check --repair`) decides a blob is unreferenced while an
upload of identical bytes has found the file in place but not yet committed its row.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from paramserve.registry import Store
from paramserve.registry.check import check
from paramserve.service.client import Client

from conftest import ServerProcess, reference_module

ROUNDS = 60
UPLOADERS = 2


def state(seed: int = 1) -> dict:
    return reference_module("small_mlp", False, seed=seed).state_dict()


def after_a_while(span_s: float, job):
    """``job`` started at a random point of ``span_s`` (an upload's duration), so the rounds
    sweep the whole upload: the unsafe window is a millisecond or two of it."""
    rng = random.Random(17)

    def delayed():
        time.sleep(rng.uniform(0, span_s))
        return job()

    return delayed


def upload_duration_s(upload) -> float:
    started = time.perf_counter()
    for _ in range(3):
        upload()
    return (time.perf_counter() - started) / 3


def run_together(*jobs) -> list:
    """Run the callables at once (a barrier lines them up); re-raise the first error."""
    barrier = threading.Barrier(len(jobs))
    errors, results = [], [None] * len(jobs)

    def run(i, job):
        try:
            barrier.wait()
            results[i] = job()
        except BaseException as err:  # re-raised below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return results


def assert_clean(store: Store) -> None:
    report = check(store)
    assert report.missing_blobs == [] and report.corrupt_blobs == [], report
    assert report.ok


def make_old_orphan(store: Store, sha: str, data: bytes) -> None:
    """The blob file of ``sha`` with no version row, last modified two hours ago."""
    path = store.blobs.path(sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    old = time.time() - 7200
    os.utime(path, (old, old))


def race_deletes_with_uploads(uploader, deleter, name: str, weights: dict, span_s: float,
                              rounds: int, store: Store | None = None) -> None:
    """Rounds of: version ``latest`` deleted through ``deleter`` while UPLOADERS uploads of
    the same bytes go through ``uploader`` (a Client or a Store); every new version readable,
    ``store`` (if given) clean after each round; one version of the bytes left for the next."""
    latest = 1
    for _ in range(rounds):
        uploads = [lambda: uploader.upload(name, weights).number] * UPLOADERS
        _, *numbers = run_together(after_a_while(
            span_s, lambda: deleter.delete_version(name, latest)), *uploads)
        if store is not None:
            assert_clean(store)
        for number in numbers:
            assert uploader.tensor(name, "0.bias", number).shape == (8,)
        latest = numbers.pop()
        for number in numbers:
            deleter.delete_version(name, number)


def race_repairs_with_uploads(uploader, store: Store, name: str, weights: dict, sha: str,
                              data: bytes, span_s: float, rounds: int) -> None:
    """Rounds of: ``sha``'s blob made an old orphan, then ``check --repair`` on ``store``
    while UPLOADERS uploads of those bytes go through ``uploader``; clean after each round,
    every new version readable, then deleted."""
    for _ in range(rounds):
        make_old_orphan(store, sha, data)
        uploads = [lambda: uploader.upload(name, weights).number] * UPLOADERS
        _, *numbers = run_together(after_a_while(
            span_s, lambda: check(store, repair=True)), *uploads)
        assert_clean(store)
        for number in numbers:
            assert uploader.tensor(name, "0.bias", number).shape == (8,)
            uploader.delete_version(name, number)


@pytest.fixture(scope="module")
def race_server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("races") / "data")
    yield srv
    srv.stop()


def test_delete_version_racing_uploads_of_the_same_bytes_through_a_server(race_server):
    with Client(race_server.address, timeout_s=60) as client:
        client.create_model("race-delete", "small_mlp")
        weights = state()
        span_s = upload_duration_s(lambda: client.upload("race-delete", weights))
        for version in client.list_versions("race-delete")[1:]:
            client.delete_version("race-delete", version.number)
        race_deletes_with_uploads(client, client, "race-delete", weights, span_s, ROUNDS)
    with Store(data_dir=race_server.data_dir) as store:
        assert_clean(store)
        assert len(store.list_versions("race-delete")) == 1


def test_repair_racing_an_upload_that_reuses_an_old_orphan_through_a_server(race_server):
    with Client(race_server.address, timeout_s=60) as client, \
            Store(data_dir=race_server.data_dir) as store:
        client.create_model("race-repair", "small_mlp")
        weights = state(seed=2)
        span_s = upload_duration_s(lambda: client.upload("race-repair", weights))
        first = client.upload("race-repair", weights)
        data = store.blobs.path(first.sha256).read_bytes()
        for version in client.list_versions("race-repair"):
            client.delete_version("race-repair", version.number)
        race_repairs_with_uploads(client, store, "race-repair", weights, first.sha256, data,
                                  span_s, ROUNDS)
        assert_clean(store)


def test_a_delete_between_an_upload_placing_its_blob_and_committing_its_row(store):
    """The interleaving of the race, made deterministic: another version of the same bytes is
    deleted right after the upload's blob is in place, before its row commits."""
    store.create_model("m", "small_mlp")
    weights = reference_module("small_mlp", False).state_dict()
    store.upload("m", weights)
    commit = store.blobs.commit

    def commit_then_delete(writer):
        blob = commit(writer)
        store.delete_version("m", store.latest_or_none("m").number)
        return blob

    store.blobs.commit = commit_then_delete
    version = store.upload("m", weights)
    store.blobs.commit = commit
    assert store.blobs.exists(version.sha256)
    assert store.state_dict("m")["0.weight"].shape == (8, 4)
    assert_clean(store)


def test_repair_keeps_a_blob_that_an_upload_holds(store):
    """A repair run while an upload holds a blob (file placed, row not yet committed) keeps
    it, however old the file's mtime; a crashed writer's stale hold is removed."""
    store.create_model("m", "small_mlp")
    weights = reference_module("small_mlp", False).state_dict()
    first = store.upload("m", weights)
    data = store.blobs.path(first.sha256).read_bytes()
    store.delete_version("m", 1)
    make_old_orphan(store, first.sha256, data)
    commit = store.blobs.commit
    reports = []

    def commit_then_repair(writer):
        blob = commit(writer)
        old = time.time() - 7200
        os.utime(store.blobs.path(blob.sha256), (old, old))
        reports.append(check(store, repair=True))
        return blob

    store.blobs.commit = commit_then_repair
    version = store.upload("m", weights)
    store.blobs.commit = commit
    assert reports[0].removed == [] and reports[0].held_blobs
    assert store.blobs.exists(version.sha256)
    assert_clean(store)
    # A hold whose writer died: repair leaves it while young, removes it (and the blob) once stale.
    store.delete_version("m", version.number)
    make_old_orphan(store, first.sha256, data)
    store.repository.add_hold(first.sha256)
    assert check(store, repair=True).removed == []
    assert store.blobs.exists(first.sha256)
    report = check(store, repair=True, stale_hold_s=0)
    assert report.removed == [str(store.blobs.path(first.sha256))]
    assert check(store).held_blobs == []


def test_postgresql_delete_and_repair_race_uploads_from_two_stores(postgres_url, tmp_path):
    """Two Store objects (two connection pools: what two replicas are) on one PostgreSQL
    database and one blob directory: deletes and repairs on one, uploads on the other."""
    with Store(postgres_url, data_dir=tmp_path) as deleter, \
            Store(postgres_url, data_dir=tmp_path) as uploader:
        uploader.create_model("m", "small_mlp")
        weights = state(seed=3)
        span_s = upload_duration_s(lambda: uploader.upload("m", weights))
        for version in uploader.list_versions("m")[1:]:
            uploader.delete_version("m", version.number)
        race_deletes_with_uploads(uploader, deleter, "m", weights, span_s, ROUNDS // 2,
                                  store=deleter)
        sha = deleter.resolve("m").sha256
        data = deleter.blobs.path(sha).read_bytes()
        for version in deleter.list_versions("m"):
            deleter.delete_version("m", version.number)
        race_repairs_with_uploads(uploader, deleter, "m", weights, sha, data, span_s,
                                  ROUNDS // 2)
        assert_clean(deleter)
