"""The seeds' MLP trained through the server (``Train``) equals the same steps in-process.

The guide's loop — ``loss = loss_fn(net(X), y); trainer.zero_grad(); loss.backward();
trainer.step()`` — run a few hundred times as ``Train`` RPCs on the same batches: the loss
falls, every reported loss equals the in-process one, and the final parameters are the same
bits on CPU.

Thread counts matter: on this MLP, 200 in-process steps on 1 torch thread and on 2 differ from
step 11 (a CPU kernel splits a reduction by thread). So both sides are pinned to one thread:
the server by ``--torch-threads 1``, which must reach every thread it computes in (its pools
set it in each thread they start: a thread keeps the count it had at its first torch call),
and this process around the in-process steps.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import ServerProcess, reference_module
from torch import nn

STEPS = 200
OPTIMIZER = "sgd(lr=0.05, momentum=0.9)"


def batches(n: int = 4, rows: int = 16):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(20, 10, generator=g)
    out = []
    for _ in range(n):
        X = torch.randn(rows, 20, generator=g)
        out.append((X, X @ w * 0.1 + 0.01 * torch.randn(rows, 10, generator=g)))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One torch thread in the server's every thread, as in this process (see the docstring)."""
    srv = ServerProcess(tmp_path_factory.mktemp("server") / "data", "--torch-threads", "1")
    yield srv
    srv.stop()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_seeds_mlp_trained_through_the_server_equals_in_process(client, model_name, one_thread):
    net = reference_module("mlp", lazy=False)  # the MLP class: hidden 20→256, out 256→10
    client.create_model(model_name, "mlp")
    client.upload(model_name, net.state_dict())
    data = batches()

    trainer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.MSELoss()
    local_losses, served_losses = [], []
    started = time.monotonic()
    for step in range(STEPS):
        X, y = data[step % len(data)]
        version, served = client.train(model_name, X, y, loss="mse", optimizer=OPTIMIZER)
        served_losses.append(served)
        loss = loss_fn(net(X), y)
        trainer.zero_grad()
        loss.backward()
        trainer.step()
        local_losses.append(float(loss.detach()))
    elapsed = time.monotonic() - started

    assert version.number == 1 + STEPS and version.parent == STEPS
    assert served_losses == local_losses  # the loss before each step, bit for bit
    assert served_losses[-1] < 0.25 * served_losses[0], served_losses[:: STEPS // 10]
    final = client.state_dict(model_name)
    for name, value in net.state_dict().items():
        assert torch.equal(final[name], value), f"{name} differs after {STEPS} steps"
    assert elapsed < 60, f"{STEPS} Train calls took {elapsed:.1f} s"


def test_readme_backprop_example_runs_against_a_server(server):
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = next(
        b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "client.train(" in b
    )
    example = example.replace("127.0.0.1:8001", server.address)
    done = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "version 51, loss" in done.stdout and "pushed version 52 (parent 51)" in done.stdout


def test_cli_train_runs_steps_on_a_batch(server, tmp_path, model_name):
    import subprocess
    import sys

    import numpy as np

    from paramserve.service.client import Client

    with Client(server.address) as client:
        client.create_model(model_name, "sequential_mlp", {"in_features": 3, "hidden": 4})
        client.upload(
            model_name, nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 10)).state_dict()
        )
    X, Y = tmp_path / "X.npy", tmp_path / "Y.npy"
    np.save(X, np.ones((2, 3), np.float32))
    np.save(Y, np.zeros((2, 10), np.float32))
    def train(optimizer: str, *more: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "paramserve.service.cli", "--server", server.address,
             "train", model_name, "--input", str(X), "--target", str(Y), "--loss", "mse",
             "--optimizer", optimizer, *more],
            capture_output=True, text=True, timeout=120,
        )

    done = train("adam(lr=0.01)", "--steps", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and lines[-1].endswith("version 4 (parent 3)"), lines
    bad = train("adam(lr=-1)")
    assert bad.returncode != 0 and "lr must be finite and > 0" in bad.stderr, bad.stderr


def test_train_checks_inputs_against_the_signature_before_any_work(client, model_name):
    from paramserve.registry.errors import InvalidArgument

    client.create_model(model_name, "mlp")
    client.upload(model_name, reference_module("mlp", lazy=False).state_dict())
    for x, y, loss, opt in [
        (torch.ones(2, 7), torch.ones(2, 10), "mse", "sgd(lr=0.1)"),  # not 20 features
        (torch.ones(2, 20), torch.ones(2, 10), "hinge", "sgd(lr=0.1)"),
        (torch.ones(2, 20), torch.ones(2, 10), "mse", "sgd(lr=inf)"),
    ]:
        with pytest.raises(InvalidArgument):
            client.train(model_name, x, y, loss=loss, optimizer=opt)
    assert len(client.list_versions(model_name)) == 1
