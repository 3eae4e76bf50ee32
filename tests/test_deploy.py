"""The docker compose example stays consistent with the server's command line: two replicas on
PostgreSQL and a SeaweedFS bucket, every flag and PARAMSERVE_* variable one `serve` accepts."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import yaml

from paramserve.service.cli import build_parser
from paramserve.service.config import LogSettings, server_fields
from paramserve.service.settings import convert, env_of, settings_of

COMPOSE = Path(__file__).resolve().parent.parent / "deploy" / "docker-compose.yml"


def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]  # resolves the x-replica anchor


def test_compose_replicas_use_flags_the_server_accepts():
    replicas = {name: s for name, s in services().items() if name.startswith("replica-")}
    assert len(replicas) == 2
    fields = {env_of(f): f for f in server_fields() + settings_of(LogSettings)}
    for service in replicas.values():
        args = build_parser().parse_args(["serve", *service["command"]])
        assert args.registry_url.startswith("postgresql+psycopg://")
        assert urlparse(args.registry_url).hostname == "postgres"
        assert args.blob_url == "s3://paramserve/blobs"
        assert urlparse(args.s3_endpoint_url).hostname == "seaweedfs"
        assert args.sync_interval_s > 0
        assert "volumes" not in service  # no shared blob volume: the bucket holds the blobs
        for name, value in service["environment"].items():
            if name.startswith("PARAMSERVE_"):
                assert name in fields, f"{name} is not a `paramserve serve` setting"
                convert(fields[name], value)
            else:
                assert name.startswith("AWS_"), name
        assert service["environment"]["PARAMSERVE_HTTP_LISTEN"].startswith("0.0.0.0:")
    host_ports = [p for s in replicas.values() for p in s["ports"]]
    assert len(set(host_ports)) == len(host_ports) == 6


def test_compose_runs_seaweedfs_with_the_bucket_the_replicas_name():
    every = services()
    weed = " ".join(every["seaweedfs"]["command"])
    assert weed.startswith("server ") and " -s3 " in f" {weed} " and "-s3.port=8333" in weed
    bucket = " ".join(every["bucket"]["command"])
    assert "http://seaweedfs:8333" in bucket and "--bucket paramserve" in bucket
    for name in ("replica-1", "replica-2"):
        assert set(every[name]["depends_on"]) == {"postgres", "bucket"}
