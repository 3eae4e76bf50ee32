"""The servers benchmarks/throughput.py measures, one at a time: the yardstick floor, paramserve
from any tree (a PYTHONPATH naming it, or a git revision checked out for the run), and what
each costs: process-tree CPU time from /proc and ModelStatistics counts.

Every server listens on 127.0.0.1 and is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import add_mlp, floor_proc, serve_proc  # noqa: E402

MODEL = "mlp_small"  # every server's name for the 20→256→10 seed-0 MLP
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """A running server: where it answers, its root PID (its process tree is what it costs)."""

    name: str
    address: str
    pid: int
    stop: Callable[[], object]
    model: str = MODEL
    input_name: str = "input"
    model_config: bool = True  # perf_analyzer needs the ModelConfig RPC
    notes: list[str] = field(default_factory=list)

    def loop(self) -> str:
        """The event loop its processes run on: uvloop when its extension is mapped in."""
        for pid in tree(self.pid):
            try:
                if "uvloop/loop." in Path(f"/proc/{pid}/maps").read_text():
                    return "uvloop"
            except OSError:
                continue
        return "asyncio"


def tree(pid: int) -> list[int]:
    """``pid`` and every descendant, from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(parents.get(p, []))
    return found


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, reaped children included) of ``pid``'s process tree."""
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total * TICK_S


def _stubs(address: str):
    import grpc

    from paramserve.protos import inference_pb2 as pb
    from paramserve.protos import inference_pb2_grpc

    channel = grpc.insecure_channel(address)
    return channel, pb, inference_pb2_grpc.GRPCInferenceServiceStub(channel)


def statistics(server: Server) -> tuple[int, int] | None:
    """(inference_count, execution_count) from ModelStatistics; None where not implemented."""
    import grpc

    channel, pb, stub = _stubs(server.address)
    try:
        with channel:
            reply = stub.ModelStatistics(pb.ModelStatisticsRequest(name=server.model), timeout=10)
    except grpc.RpcError:
        return None
    stats = [s for s in reply.model_stats if s.name == server.model] or list(reply.model_stats)
    if not stats:
        return None
    return (sum(s.inference_count for s in stats), sum(s.execution_count for s in stats))


def wait_ready(server: Server, proc=None, limit_s: float = 180) -> None:
    import grpc

    channel, pb, stub = _stubs(server.address)
    deadline = time.monotonic() + limit_s
    with channel:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited {proc.returncode} while starting")
            try:
                request = pb.ModelReadyRequest(name=server.model)
                if stub.ModelReady(request, timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise RuntimeError(f"{server.name}: {server.model} not ready after {limit_s:.0f} s")


def reference_forward(x: np.ndarray) -> np.ndarray:
    import torch
    from torch import nn

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def check_outputs(server: Server) -> float:
    """Max abs error of its answer to a batch of 1 and of 7 against the seed-0 MLP here;
    raises when it is over 1e-4 (a server serving other weights measures nothing)."""
    channel, pb, stub = _stubs(server.address)
    worst = 0.0
    with channel:
        for rows in (1, 7):
            x = np.random.default_rng(rows).standard_normal((rows, 20)).astype(np.float32)
            request = pb.ModelInferRequest(model_name=server.model)
            request.inputs.add(name=server.input_name, datatype="FP32", shape=[rows, 20])
            request.raw_input_contents.append(x.tobytes())
            reply = stub.ModelInfer(request, timeout=30)
            if reply.raw_output_contents:
                y = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)
            else:
                y = np.asarray(reply.outputs[0].contents.fp32_contents, dtype=np.float32)
            worst = max(worst, float(np.abs(y.reshape(rows, 10) - reference_forward(x)).max()))
    if worst > 1e-4:
        raise RuntimeError(f"{server.name} answers differ from the seed-0 MLP by {worst:g}")
    return worst


def start_yardstick(tmp: Path, loop: str) -> Server:
    port_file = tmp / f"yardstick-{loop}-{time.monotonic_ns()}.port"
    proc = floor_proc(port_file, None, "--inference", "yardstick", "--loop", loop)
    server = Server(f"yardstick ({loop})", proc.address, proc.proc.pid, proc.stop)
    server.notes.append(f"benchmarks/floors.py --inference yardstick --loop {loop}")
    return server


def env_for(pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p)
    return env


def start_paramserve(name: str, tmp: Path, pythonpath: str | None, *flags: str) -> Server:
    """``serve`` from the tree ``pythonpath`` names (None: the importable paramserve), holding
    the seed-0 MLP as ``mlp_small``."""
    from paramserve.service.client import Client

    data = Path(tempfile.mkdtemp(prefix="data-", dir=tmp))
    workers = "--workers" in flags
    proc = serve_proc(data, *flags, *(["--sync-interval-s", "0.2"] if workers else []),
                      env=env_for(pythonpath))
    server = Server(name, proc.address, proc.proc.pid, proc.stop)
    try:
        with Client(proc.address, timeout_s=120) as client:
            add_mlp(client, MODEL)
        if workers:
            time.sleep(1.0)  # every worker has seen the new model
        wait_ready(server, proc.proc)
    except BaseException:
        proc.stop()
        raise
    return server


def tree_label(pythonpath: str | None) -> str:
    """Which paramserve a PYTHONPATH imports: its checkout and commit (+ "dirty")."""
    out = subprocess.run([sys.executable, "-c", "import paramserve.service as s; "
                          "print(s.__file__)"], capture_output=True, text=True,
                         env=env_for(pythonpath), timeout=60)
    if out.returncode != 0:
        return f"unimportable: {out.stderr.strip().splitlines()[-1:]}"
    where = Path(out.stdout.strip()).resolve().parent.parent
    rev = subprocess.run(["git", "-C", str(where), "log", "-1", "--format=%h"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True).stdout
    return f"{where} {rev or '?'}{'+dirty' if dirty.strip() else ''}"


class BaselineTree:
    """``git worktree add --detach`` of ``rev`` in a temp dir, importable as paramserve
    through a tree of links (its protos/generated copied from the current tree); removed
    on exit."""

    def __init__(self, rev: str, current_pythonpath: str | None, tmp: Path):
        self.rev, self.tmp, self.current = rev, tmp, current_pythonpath
        self.repo = Path(__file__).resolve().parent.parent
        self.checkout = tmp / f"baseline-{rev}"
        self.pythonpath = str(tmp / "baseline-path")

    def __enter__(self) -> BaselineTree:
        subprocess.run(["git", "-C", str(self.repo), "worktree", "add", "--detach",
                        str(self.checkout), self.rev], check=True, capture_output=True)
        try:
            self._link()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _link(self) -> None:
        generated = self._current_protos() / "generated"
        shutil.copytree(generated, self.checkout / "protos" / "generated", dirs_exist_ok=True)
        package = Path(self.pythonpath) / "paramserve"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        for part in ("registry", "service", "protos"):
            (package / part).symlink_to(self.checkout / part)
        check = [sys.executable, "-c", "from paramserve.protos import inference_pb2"]
        if subprocess.run(check, capture_output=True, env=env_for(self.pythonpath)).returncode:
            # REV's .proto files differ from the current tree's: build its own descriptor set
            subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'protos'); "
                            "from pathlib import Path; import compile; compile.compile_protos("
                            "Path('protos'), Path('protos/generated'))"],
                           cwd=self.checkout, check=True, capture_output=True, timeout=120)

    def _current_protos(self) -> Path:
        out = subprocess.run([sys.executable, "-c", "import paramserve.protos as p; "
                              "print(p.__file__)"], capture_output=True, text=True,
                             check=True, timeout=60, env=env_for(self.current))
        return Path(out.stdout.strip()).resolve().parent

    def label(self) -> str:
        rev = subprocess.run(["git", "-C", str(self.checkout), "log", "-1", "--format=%h"],
                             capture_output=True, text=True).stdout.strip()
        return f"baseline {rev}"

    def __exit__(self, *exc) -> None:
        subprocess.run(["git", "-C", str(self.repo), "worktree", "remove", "--force",
                        str(self.checkout)], capture_output=True)
