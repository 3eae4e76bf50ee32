"""The docker compose example stays consistent with the server's command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

from paramserve.service.cli import build_parser

COMPOSE = Path(__file__).resolve().parent.parent / "deploy" / "docker-compose.yml"


def test_compose_replicas_use_flags_the_server_accepts():
    commands = [json.loads(m) for m in re.findall(r"command: (\[.*\])", COMPOSE.read_text())]
    assert len(commands) == 2
    for command in commands:
        args = build_parser().parse_args(["serve", *command])
        assert args.registry_url.startswith("postgresql+psycopg://")
        assert args.data_dir == "/data" and args.sync_interval_s > 0
    assert len(re.findall(r"- blobs:/data", COMPOSE.read_text())) == 2  # one shared volume
