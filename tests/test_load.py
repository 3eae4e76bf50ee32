"""Under load: 16 clients for 20 s while `production` moves between two versions 100 times.
Zero failed requests, every answer from exactly one of the two versions, memory back to where
it was. Bounded in time, loopback only."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from paramserve.service.client import Client

from conftest import reference_module

CLIENTS = 16
DURATION_S = 20.0
ALIAS_MOVES = 100


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_alias_moves_under_load_fail_nothing(server, model_name):
    first, second = (reference_module("rgnet", False, seed=s) for s in (1, 2))
    x = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    expected = [first(x).detach(), second(x).detach()]
    assert (expected[0] - expected[1]).abs().max() > 1e-3
    with Client(server.address) as admin:
        admin.create_model(model_name, "rgnet")
        admin.upload(model_name, first.state_dict(), alias="production")
        admin.upload(model_name, second.state_dict())
        for ref in ("1", "2", "production"):  # warm: both versions loaded
            admin.infer(model_name, x, ref)
        before = rss_bytes(server.proc.pid)
        stop = time.monotonic() + DURATION_S
        counts, failures, mismatches = [0] * CLIENTS, [], []

        def load(i):
            with Client(server.address, timeout_s=30) as client:
                while time.monotonic() < stop:
                    try:
                        y = client.infer(model_name, x, "production")
                    except Exception as err:  # collected and asserted below
                        failures.append(repr(err))
                        continue
                    matches = [bool((y - e).abs().max() <= 1e-6) for e in expected]
                    if matches.count(True) != 1:
                        mismatches.append(y)
                    counts[i] += 1

        workers = [threading.Thread(target=load, args=(i,)) for i in range(CLIENTS)]
        for w in workers:
            w.start()
        for move in range(ALIAS_MOVES):
            admin.set_alias(model_name, "production", 1 + move % 2)
            time.sleep(DURATION_S / ALIAS_MOVES * 0.9)
        for w in workers:
            w.join(DURATION_S + 60)
        after = rss_bytes(server.proc.pid)
    assert failures == [] and mismatches == []
    assert sum(counts) > CLIENTS * 10 and min(counts) > 0
    assert after <= before * 1.10, f"RSS grew from {before >> 20} MiB to {after >> 20} MiB"
