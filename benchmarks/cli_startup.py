"""Wall time of a ``paramserve`` command, beside bare Python's start measured in the same run.

    python benchmarks/cli_startup.py [--repeat 15] [--out benchmarks/results/NAME.json]

Rows (median of ``--repeat`` runs, the commands taken in turn so that load hits all alike):
  python -c pass          the floor: an interpreter that does nothing
  paramserve --version    the parser alone
  paramserve health       a health check against a real server (the Docker HEALTHCHECK)
  paramserve models       a client command against a real server (two models listed)
Targets (the 2-core box): health ≤ 0.3 s, models ≤ 0.5 s of wall time (judged on the median;
the CPU time of each run is reported beside it, as load from other processes inflates wall
time far more than CPU time). Prints a table and writes JSON
describing the machine (with its load average: the box is shared), and the table as .txt.
This process imports neither torch nor paramserve: it only starts commands.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from table import MET, machine, write_results
from table import format_table as table_text

HERE = Path(__file__).resolve().parent
TARGETS_S = {"health": 0.3, "models": 0.5}


def paramserve_command() -> list[str]:
    """The console script a user runs, else ``python -m`` (the same entry point)."""
    script = shutil.which("paramserve")
    return [script] if script else [sys.executable, "-m", "paramserve.service.cli"]


def start_server(data_dir: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "paramserve.service.cli", "serve",
                             "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
                             "--metrics-listen", "off"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
    return proc, f"127.0.0.1:{port}"


def bytecode_env(cache_dir: Path) -> dict[str, str]:
    """The environment of every measured command: bytecode cached (in ``cache_dir``, not in
    the checkout), as an installed package has it. With PYTHONDONTWRITEBYTECODE (set on the
    shared development box) each run would compile paramserve's modules anew: ~60 ms."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache_dir)
    return env


def run_s(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run; CPU (user + system, from the children's rusage) is
    what load on a shared box inflates least."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def measure(commands: dict[str, list[str]], repeat: int,
            env: dict[str, str]) -> dict[str, list[tuple]]:
    times: dict[str, list[tuple]] = {name: [] for name in commands}
    for command in commands.values():  # one unmeasured run each: page and bytecode caches
        run_s(command, env)
    for _ in range(repeat):
        for name, command in commands.items():
            times[name].append(run_s(command, env))
    return times


def format_table(rows: list[dict]) -> str:
    header = ["command", "median s", "min s", "max s", "over floor s", "CPU s (median)",
              "target", "met"]
    table = [[r["command"], f"{r['median_s']:.3f}", f"{r['min_s']:.3f}", f"{r['max_s']:.3f}",
              f"{r['over_floor_s']:.3f}", f"{r['cpu_median_s']:.3f}", r["target"] or "-",
              MET[r["met"]]] for r in rows]
    return table_text(header, table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15, help="runs of each command")
    parser.add_argument("--out", default=str(HERE / "results" / "cli-startup.json"),
                        help="the JSON; the table goes beside it as .txt")
    args = parser.parse_args()
    paramserve = paramserve_command()
    figures = {"machine": machine(), "paramserve": " ".join(paramserve),
               "repeat": args.repeat,
               "bytecode": "cached (a temporary PYTHONPYCACHEPREFIX), as installed"}
    with tempfile.TemporaryDirectory(prefix="paramserve-cli-bench-") as tmp:
        server, address = start_server(Path(tmp) / "data")
        try:
            for name in ("bench-a", "bench-b"):
                subprocess.run([*paramserve, "--server", address, "create", name,
                                "--architecture", "small_mlp"], check=True,
                               stdout=subprocess.DEVNULL)
            commands = {"python -c pass": [sys.executable, "-c", "pass"],
                        "paramserve --version": [*paramserve, "--version"],
                        "paramserve health": [*paramserve, "--server", address, "health"],
                        "paramserve models": [*paramserve, "--server", address, "models"]}
            times = measure(commands, args.repeat, bytecode_env(Path(tmp) / "pycache"))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    figures["machine"]["load_average_after"] = list(os.getloadavg())
    floor = statistics.median(wall for wall, _ in times["python -c pass"])
    rows = []
    for name, runs in times.items():
        target = TARGETS_S.get(name.split()[-1])
        samples = [wall for wall, _ in runs]
        median = statistics.median(samples)
        rows.append({"command": name, "median_s": median, "min_s": min(samples),
                     "max_s": max(samples), "over_floor_s": median - floor,
                     "cpu_median_s": statistics.median(cpu for _, cpu in runs),
                     "target": f"≤ {target} s" if target else None,
                     "met": (median <= target) if target else None, "samples_s": samples,
                     "cpu_samples_s": [cpu for _, cpu in runs]})
    figures["rows"] = rows
    table = format_table(rows)
    m = figures["machine"]
    label = (f"{m['cores']} cores, {m['cpu']}; load average {m['load_average'][0]:.2f} before, "
             f"{m['load_average_after'][0]:.2f} after; median of {args.repeat}")
    write_results(args.out, label, table, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
