"""Three replicas on one PostgreSQL registry and one SeaweedFS bucket, each with a data dir of
its own (no shared volume): what one writes the others serve, pushed changes reach them, a
replica killed mid-upload leaves nothing half-visible, and a damaged object is DATA_LOSS
everywhere.

The replicas poll every 30 s, so a change seen within PUSHED_WITHIN_S came by NOTIFY.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from paramserve.protos import inference_pb2 as pb
from paramserve.protos import inference_pb2_grpc
from paramserve.registry import get_architecture
from paramserve.registry.errors import DataLoss
from paramserve.service.client import Client

from conftest import ServerProcess, files_under, fresh_postgres_database, reference_module
from seaweed import SeaweedFS

LONG_POLL_S = 30.0
PUSHED_WITHIN_S = 2.0
STEP_TIMEOUT_S = 120  # any one subprocess or wait here
BIG_HIDDEN = 300_000  # sequential_mlp with this hidden width: about 35 MiB, 5 parts of 8 MiB

# A slow client in a process of its own: the replica is killed while its chunks stream.
UPLOADER = """
import sys, time
from paramserve.registry import get_architecture
from paramserve.service.client import Client

address, name, hidden = sys.argv[1], sys.argv[2], int(sys.argv[3])
state = get_architecture("sequential_mlp").build({"hidden": hidden}, seed=7).state_dict()
with Client(address, timeout_s=300) as client:
    client.upload(name, state, progress=lambda done, total: time.sleep(0.03))
"""


class Cluster:
    def __init__(self, url, store: SeaweedFS, prefix: str, tmp):
        self.url, self.s3store, self.prefix, self.tmp = url, store, prefix, tmp
        self.s3 = store.client()
        self.servers: dict[str, ServerProcess] = {}
        self.clients: dict[str, Client] = {}

    def args(self) -> list[str]:
        return ["--registry-url", self.url, *self.s3store.server_args(self.prefix)]

    def start(self, name: str) -> None:
        self.servers[name] = ServerProcess(
            self.tmp / f"data-{name}", *self.args(), "--sync-interval-s", str(LONG_POLL_S),
            env=self.s3store.env, log_name=name)
        self.clients[name] = Client(self.servers[name].address, timeout_s=60)

    def stop(self) -> None:
        for client in self.clients.values():
            client.close()
        for server in self.servers.values():
            server.stop()

    def check(self, *extra: str) -> dict:
        """``paramserve check --json`` on the shared registry and bucket, as an operator runs it."""
        out = subprocess.run(
            [sys.executable, "-m", "paramserve.service.cli", "check", "--json",
             "--data-dir", str(self.servers["A"].data_dir), *self.args(), *extra],
            capture_output=True, text=True, timeout=STEP_TIMEOUT_S,
            env={**os.environ, **self.s3store.env})
        assert out.stdout, out.stderr
        return json.loads(out.stdout)

    def unfinished_uploads(self) -> list[dict]:
        page = self.s3.list_multipart_uploads(Bucket=self.s3store.bucket,
                                              Prefix=f"{self.prefix}/")
        return page.get("Uploads", [])

    def temp_objects(self) -> list[str]:
        page = self.s3.list_objects_v2(Bucket=self.s3store.bucket, Prefix=f"{self.prefix}/tmp/")
        return [item["Key"] for item in page.get("Contents", [])]

    def key(self, sha256: str) -> str:
        return f"{self.prefix}/sha256/{sha256[:2]}/{sha256}.safetensors"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas-s3")
    with SeaweedFS(tmp / "seaweed") as store, fresh_postgres_database() as url:
        running = Cluster(url, store, f"replicas-{uuid.uuid4().hex[:8]}", tmp)
        try:
            for name in "ABC":
                running.start(name)
            yield running
        finally:
            running.stop()


def eventually(check, within_s: float):
    deadline = time.monotonic() + within_s
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def test_an_upload_on_a_is_served_identically_by_b_and_c_from_the_bucket(cluster):
    clients = cluster.clients
    module = reference_module("chimera", False)
    clients["A"].create_model("s3-chimera", "chimera")
    version = clients["A"].upload("s3-chimera", module.state_dict())
    head = cluster.s3.head_object(Bucket=cluster.s3store.bucket, Key=cluster.key(version.sha256))
    assert head["ContentLength"] == version.size_bytes
    x = torch.rand(3, 20)
    outputs = [clients[n].infer("s3-chimera", x) for n in "BC"]
    assert torch.equal(torch.as_tensor(outputs[0]), torch.as_tensor(outputs[1]))
    with torch.no_grad():
        assert (torch.as_tensor(outputs[0]) - module(x)).abs().max() <= 1e-6
    downloaded = clients["C"].state_dict("s3-chimera")
    assert all(torch.equal(downloaded[k], v) for k, v in module.state_dict().items())
    for name in "ABC":  # the blobs are in the bucket only
        assert files_under(cluster.servers[name].data_dir / "blobs") == []


def test_an_alias_moved_on_c_is_served_by_a_within_the_bound(cluster):
    clients = cluster.clients
    first, second = (reference_module("small_mlp", False, seed=s) for s in (1, 2))
    clients["C"].create_model("s3-moving", "small_mlp")
    clients["C"].upload("s3-moving", first.state_dict(), alias="production")
    clients["C"].upload("s3-moving", second.state_dict())
    x = torch.rand(2, 4)
    with torch.no_grad():
        expected = {1: first(x), 2: second(x)}

    def a_serves(number):
        def check():
            got = torch.as_tensor(clients["A"].infer("s3-moving", x, "production"))
            assert torch.allclose(got, expected[number], atol=1e-6)
        return check

    eventually(a_serves(1), PUSHED_WITHIN_S)
    clients["C"].set_alias("s3-moving", "production", 2)
    moved = time.monotonic()
    eventually(a_serves(2), PUSHED_WITHIN_S)
    assert time.monotonic() - moved <= PUSHED_WITHIN_S


def test_killing_b_mid_upload_leaves_nothing_half_visible_and_cleanup_leaves_no_upload(cluster):
    clients, servers = cluster.clients, cluster.servers
    clients["A"].create_model("s3-survivor", "sequential_mlp", {"hidden": BIG_HIDDEN})
    module = get_architecture("sequential_mlp").build({"hidden": BIG_HIDDEN}, seed=0)
    clients["A"].upload("s3-survivor", module.state_dict(), alias="production")
    before = [(v.number, v.sha256) for v in clients["A"].list_versions("s3-survivor")]
    assert cluster.unfinished_uploads() == []
    uploader = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, servers["B"].address, "s3-survivor", str(BIG_HIDDEN)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not cluster.unfinished_uploads():  # B streams the chunks into a multipart upload
            assert uploader.poll() is None, uploader.stderr.read()
            assert time.monotonic() < deadline, "B never started a multipart upload"
            time.sleep(0.02)
        servers["B"].proc.send_signal(signal.SIGKILL)
        servers["B"].proc.wait(STEP_TIMEOUT_S)
        assert uploader.wait(STEP_TIMEOUT_S) != 0  # the client was told, not left hanging
    finally:
        if uploader.poll() is None:
            uploader.kill()
            uploader.wait()
        uploader.stderr.close()
    clients.pop("B").close()
    for name in "AC":
        assert [(v.number, v.sha256) for v in clients[name].list_versions("s3-survivor")] == before
    report = cluster.check()
    assert report["ok"], report
    assert report["missing_blobs"] == [] and report["orphan_blobs"] == []
    assert any("multipart" in t for t in report["temp_files"]), report  # what B left
    repaired = cluster.check("--repair", "--min-age-s", "0")
    assert repaired["ok"] and repaired["removed"], repaired
    assert cluster.unfinished_uploads() == [] and cluster.temp_objects() == []
    assert cluster.check()["temp_files"] == []
    x = torch.rand(2, 20)
    with torch.no_grad():
        assert (torch.as_tensor(clients["C"].infer("s3-survivor", x, "production"))
                - module(x)).abs().max() <= 1e-5
    cluster.start("B")  # a replacement joins the same registry and bucket
    assert [(v.number, v.sha256)
            for v in cluster.clients["B"].list_versions("s3-survivor")] == before


def test_lazy_first_requests_on_three_replicas_create_one_version(cluster):
    clients = cluster.clients
    clients["A"].create_model("s3-lazy-race", "rgnet", {"in_features": None}, seed=9)
    x = torch.rand(2, 6)
    request = pb.ModelInferRequest(model_name="s3-lazy-race")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 6])
    request.raw_input_contents.append(x.numpy().tobytes())
    stubs = [inference_pb2_grpc.GRPCInferenceServiceStub(clients[n].channel) for n in "ABC"]
    futures = [stubs[i % 3].ModelInfer.future(request, timeout=STEP_TIMEOUT_S)
               for i in range(18)]
    outputs = [torch.frombuffer(bytearray(f.result().raw_output_contents[0]),
                                dtype=torch.float32) for f in futures]
    assert all((o - outputs[0]).abs().max() <= 1e-6 for o in outputs)  # batching may round
    assert [(v.number, v.origin) for v in clients["B"].list_versions("s3-lazy-race")] == [
        (1, "lazy-init")]


def test_a_corrupted_object_is_data_loss_on_every_replica(cluster):
    clients = cluster.clients
    module = reference_module("small_mlp", False, seed=5)
    clients["A"].create_model("s3-corrupt", "small_mlp")
    version = clients["A"].upload("s3-corrupt", module.state_dict())
    bucket, key = cluster.s3store.bucket, cluster.key(version.sha256)
    body = bytearray(cluster.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF  # a tensor byte: the header still parses, the sha256 does not match
    cluster.s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    x = torch.rand(2, 4)
    for name in "ABC":  # none has it loaded: each reads the object
        with pytest.raises(DataLoss):
            clients[name].infer("s3-corrupt", x)
        with pytest.raises(DataLoss):
            clients[name].state_dict("s3-corrupt")
    report = cluster.check()
    assert not report["ok"] and report["corrupt_blobs"], report
