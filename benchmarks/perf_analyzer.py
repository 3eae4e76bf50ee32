"""Triton's own load generator, perf_analyzer 2.51, against a paramserve server over gRPC.

    python benchmarks/perf_analyzer.py ADDRESS MODEL CONCURRENCY DURATION_S   # prints JSON
    python benchmarks/perf_analyzer.py --check                                # usable or why not

A second opinion on benchmarks/loadgen.py: a C++ client we did not write, speaking the
protocol as Triton clients do (it also reads ModelConfig and ModelStatistics). The binary
ships in the tritonclient[grpc]==2.51.0 wheel but links libb64.so.0d and libcudart.so.12;
benchmarks/setup-perf-analyzer.sh installs both (libcudart only has to load: no GPU is used).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SETUP = "run benchmarks/setup-perf-analyzer.sh"


class PerfAnalyzerUnavailable(RuntimeError):
    """perf_analyzer is not installed or cannot load its libraries."""


def _binary() -> str | None:
    # The wheel's script beside this interpreter first: a pyenv shim on PATH may point elsewhere.
    beside = Path(sys.executable).with_name("perf_analyzer")
    return str(beside) if beside.exists() else shutil.which("perf_analyzer")


def _env() -> dict:
    """LD_LIBRARY_PATH with pip's nvidia-cuda-runtime-cu12 lib dir, for perf_analyzer only."""
    env = dict(os.environ)
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:
        spec = None
    if spec and spec.submodule_search_locations:
        lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(lib), env.get("LD_LIBRARY_PATH")) if p)
    return env


def unavailable_reason() -> str | None:
    """None when perf_analyzer runs here; else one line saying why not, for a "not run" row."""
    binary = _binary()
    if binary is None:
        return "perf_analyzer not found (pip install 'tritonclient[grpc]==2.51.0')"
    try:
        p = subprocess.run([binary, "--version"], capture_output=True, text=True,
                           env=_env(), timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"perf_analyzer did not start: {e}"
    out = (p.stdout + p.stderr).strip()
    if p.returncode == 0 and "Perf Analyzer Version" in out:
        return None
    last = out.splitlines()[-1] if out else f"exit {p.returncode}"
    return f"perf_analyzer cannot run: {last} ({SETUP})"


def run_perf_analyzer(address: str, model: str, concurrency: int, duration_s: float,
                      shape=(1, 20), input_name: str = "input", streaming: bool = False,
                      connections: int | None = None) -> dict:
    """Measure one concurrency level for about ``duration_s``; returns infer/s and p50/p99 ms.

    ``shape`` includes the batch dim: shape[0] goes to ``-b`` (the model reports
    max_batch_size > 0) and the rest to ``--shape``. perf_analyzer measures in windows until
    three agree; we ask for three windows of duration_s/3 and accept any spread (-s 1000), so
    it stops after those three and reports them merged. ``streaming``: every request on
    ModelStreamInfer streams (``--streaming``). ``connections``: spread the contexts over that
    many gRPC connections (tritonclient shares one among up to 6 contexts by default; its
    TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT sets how many). Raises PerfAnalyzerUnavailable when
    the binary cannot run, RuntimeError when it fails or overruns its hard timeout.
    """
    reason = unavailable_reason()
    if reason:
        raise PerfAnalyzerUnavailable(reason)
    window_ms = max(100, round(duration_s * 1000 / 3))
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
        report = Path(tmp) / "report.csv"
        args = [_binary(), "-i", "grpc", "-u", address, "-m", model,
                "-b", str(shape[0]), "--shape", f"{input_name}:{','.join(map(str, shape[1:]))}",
                "--concurrency-range", f"{concurrency}:{concurrency}",
                "-p", str(window_ms), "-r", "3", "-s", "1000", "--percentile", "50",
                "-f", str(report), *(["--streaming"] if streaming else [])]
        timeout = 3 * duration_s + 60  # windows may overrun on a busy machine; plus startup
        env = _env()
        if connections:
            share = -(-concurrency // connections)
            env["TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT"] = str(share)
        try:
            p = subprocess.run(args, capture_output=True, text=True, env=env,
                               timeout=timeout, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"perf_analyzer ran past {timeout:.0f} s against {address}") from None
        if p.returncode != 0 or not report.exists():
            tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"perf_analyzer exited {p.returncode}:\n{tail}")
        row = next(csv.DictReader(report.open()))
    return {"concurrency": concurrency, "duration_s": duration_s, "streaming": streaming,
            "throughput_rps": float(row["Inferences/Second"]),
            "p50_ms": float(row["p50 latency"]) / 1000,  # the CSV is in microseconds
            "p99_ms": float(row["p99 latency"]) / 1000}


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        why = unavailable_reason()
        print(why or "perf_analyzer: usable")
        sys.exit(1 if why else 0)
    if len(sys.argv) != 5:
        sys.exit(__doc__.split("\n\n")[1])
    addr, name, c, d = sys.argv[1:]
    print(json.dumps(run_perf_analyzer(addr, name, int(c), float(d))))
