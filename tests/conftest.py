"""Shared fixtures: a real store on a fresh SQLite file (or a fresh PostgreSQL database)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from paramserve.registry import Store, get_architecture

ALL_BUILTINS = ["centered_layer", "centered_mlp", "chimera", "fixed_hidden_mlp", "mlp",
                "my_linear_net", "my_sequential", "nest_mlp", "rgnet", "sequential_mlp",
                "small_mlp", "tied_mlp"]
LAZY_BUILTINS = [name for name in ALL_BUILTINS if name != "centered_layer"]
POSTGRES_ADMIN_URL = os.environ.get("PARAMSERVE_TEST_POSTGRES",
                                    "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def store(tmp_path: Path):
    with Store(data_dir=tmp_path / "data") as s:
        yield s


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database for this test, dropped afterwards.

    Skips only outside CI when no server answers; in CI (CI=true) a missing server fails.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"paramserve_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN_URL}: {err}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def blob_files(store: Store) -> list[Path]:
    """Every file in the blob directory, temporary ones included."""
    return files_under(store.blobs.root)


def config_for(architecture: str, lazy: bool) -> dict:
    return {"in_features": None} if lazy else {}


def example_input(architecture: str, lazy: bool, seed: int = 0) -> torch.Tensor:
    arch = get_architecture(architecture)
    shape = arch.example_input(arch.resolve_config(config_for(architecture, lazy))).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def reference_module(architecture: str, lazy: bool, seed: int = 1) -> torch.nn.Module:
    """The module a user builds in-process; lazy ones materialized by a first input."""
    arch = get_architecture(architecture)
    module = arch.build(config_for(architecture, lazy), seed=seed)
    if lazy:
        with torch.no_grad():
            module(example_input(architecture, lazy))
    return module.eval()
