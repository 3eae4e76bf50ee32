"""Crash consistency: SIGKILL the server at random points of uploads, alias moves, inits and
patches (seeded, bounded), restart it, and check that nothing is lost or half-visible."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time

import torch

from paramserve.registry import Store, get_architecture
from paramserve.registry.check import check
from paramserve.service.client import Client

from crash_server import ForkedServer

KILLS = 50
TIME_BUDGET_S = 300
SEED = 20261123
CONFIG = {"hidden": 4096}  # ~340 KiB per version: writes take long enough to be cut short


def random_operation(client: Client, rng: random.Random, numbers: list[int]):
    kind = rng.choice(["upload", "upload", "alias", "init", "patch"])
    if kind == "upload":
        state = get_architecture("sequential_mlp").build(CONFIG, seed=rng.randrange(10**6))
        return lambda: client.upload("crashy", state.state_dict(), alias=rng.choice([None, "p"]))
    if kind == "alias":
        return lambda: client.set_alias("crashy", "production", rng.choice(numbers))
    if kind == "init":
        scheme = rng.choice(["normal(0, 0.1)", "xavier_uniform", "my_init", "zeros"])
        return lambda: client.initialize("crashy", scheme, module_path=rng.choice(["0", "2", ""]))
    return lambda: client.patch("crashy", "0.weight", rng.random(), index="0, :3")


def assert_invariants(data_dir) -> list[int]:
    with Store(data_dir=data_dir) as store:
        report = check(store)
        assert report.ok, report
        assert report.missing_blobs == report.corrupt_blobs == report.dangling_aliases == []
        versions = store.list_versions("crashy")
        for version in versions[-2:]:  # the newest ones load and run
            module = store.load("crashy", version.number)
            assert module(torch.zeros(1, 20)).shape == (1, 10)
        return [v.number for v in versions]


def test_sigkill_at_random_points_loses_and_corrupts_nothing(tmp_path):
    rng = random.Random(SEED)
    data_dir = tmp_path / "data"
    server = ForkedServer(data_dir)
    with Client(server.address) as client:
        client.create_model("crashy", "sequential_mlp", CONFIG)
        client.upload("crashy", get_architecture("sequential_mlp").build(CONFIG).state_dict())
    kills, started = 0, time.monotonic()
    numbers = [1]
    while kills < KILLS and time.monotonic() - started < TIME_BUDGET_S:
        with Client(server.address, timeout_s=30) as client:
            for _ in range(rng.randrange(1, 4)):
                operation = random_operation(client, rng, numbers)
                worker = threading.Thread(target=lambda op=operation: _swallow(op))
                worker.start()
                if rng.random() < 0.5:
                    worker.join()  # some complete before the kill, some are cut short
            time.sleep(rng.uniform(0, 0.15))
            server.kill()
            kills += 1
            worker.join(30)
        numbers = assert_invariants(data_dir)
        server = ForkedServer(data_dir)
    server.kill()
    assert kills >= KILLS, f"only {kills} kills in {TIME_BUDGET_S} s"
    assert len(numbers) > 5  # work did get through between the kills
    repaired = subprocess.run([sys.executable, "-m", "paramserve.service.cli", "check",
                               "--data-dir", str(data_dir), "--repair", "--min-age-s", "0"],
                              capture_output=True, text=True, timeout=120)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    with Store(data_dir=data_dir) as store:
        after = check(store)
    assert after.ok and after.orphan_blobs == [] and after.temp_files == []
    assert assert_invariants(data_dir) == numbers  # repair removed no referenced blob


def _swallow(operation) -> None:
    try:
        operation()
    except Exception:  # the server was killed under it: expected
        pass
