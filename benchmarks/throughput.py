"""Issue #16's throughput benchmark (targets 1-4 and 6): every ratio's two sides in one run.

    python benchmarks/throughput.py [--server-pythonpath DIR] [--baseline-rev REV]
        [--peers-dir /tmp/peers] [--rounds 2] [--duration-s 9] [--out FILE.json] [--quick]

Servers, each started alone on 127.0.0.1, measured, stopped by PID; ``--rounds`` passes over
the list (alternating servers), the median of the rounds per cell:
  yardstick   benchmarks/floors.py --inference yardstick: decode → inline forward of the same
              MLP → encode, nothing else, on uvloop and on asyncio (judged: paramserve's loop)
  paramserve  the tree under test: ``--server-pythonpath`` (a tree of links to a checkout's
              registry/service/protos as paramserve/), default the importable paramserve
  baseline    ``--baseline-rev REV``: the same for a git worktree of REV, made and removed here
  peers       triton-raw, mlserver-nobatch, kserve from ``--peers-dir`` (else "not run")
  workers     ``serve --workers N`` (N = 1, 2) under benchmarks/loadgen.py over N connections
Every server holds the 20→256→10 MLP of torch.manual_seed(0) as mlp_small (checked against a
forward here). Clients: perf_analyzer 2.51 (-i grpc -b 1, unary and --streaming; servers with
ModelConfig), the peers' oipload.py (the Python OIP client every server answers), loadgen.py.
Each cell: throughput, p50, server CPU per inference (the server's process tree's CPU time
from /proc over the run ÷ the inferences ModelStatistics counted in it; the client's count,
marked ≈, where there are no statistics) and the mean executed batch (inference_count ÷
execution_count). ``--quick``: a short pass that proves the suite runs (c1, c4, no peers, no
baseline; every row present, "not run" where a tool is missing); no figure is judged then.
"""

from __future__ import annotations

import argparse
import os
import statistics as stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402
import servers as srv  # noqa: E402
from run import loadgen  # noqa: E402
from table import MET, format_table, machine, write_results  # noqa: E402

LOOPS = ("uvloop", "asyncio")
PEERS = ("triton-raw", "mlserver-nobatch", "kserve")


def plan(args) -> list[tuple[str, str, list[tuple]]]:
    """[(key, what, [(client, mode, concurrency, connections)])] in the order served."""
    levels = (1, 4) if args.quick else (1, 4, 16)
    top = levels[-1]
    pa = [("perf_analyzer", "unary", c, 0) for c in levels] + [
        ("perf_analyzer", "stream", top, 0)]
    oip = [("oipload", "unary", c, 0) for c in ((4,) if args.quick else (4, 16))]
    jobs = [(f"yardstick-{loop}", loop, pa) for loop in LOOPS]
    jobs.append(("paramserve", "tree", pa + oip))
    jobs.append(("baseline", "baseline", pa + oip))
    jobs += [(name, "peer", (pa if name == "triton-raw" else []) + oip) for name in PEERS]
    jobs += [(f"workers{n}", "workers", [("perf_analyzer", "unary", top, n),
                                         ("loadgen", "unary", top, n)]) for n in (1, 2)]
    return jobs


def skip_reason(key: str, what: str, args) -> str | None:
    if args.only and not key.startswith(tuple(args.only.split(","))):
        return f"not in --only {args.only}"
    if what == "baseline" and (args.baseline_error or not args.baseline_rev):
        return args.baseline_error or ("--quick runs no baseline" if args.quick
                                       else "no --baseline-rev")
    if what == "peer":
        return "--quick runs no peers" if args.quick else peers.unavailable(args.peers_dir, key)
    return None


def client_reason(client: str, server: srv.Server, args) -> str | None:
    if client == "perf_analyzer":
        from perf_analyzer import unavailable_reason

        if not server.model_config:
            return "no ModelConfig RPC (perf_analyzer needs it)"
        return unavailable_reason()
    if client == "oipload":
        return peers.unavailable(args.peers_dir)
    return None


def start(key: str, what: str, args, tmp: Path, baseline_path: str | None) -> srv.Server:
    if what in LOOPS:
        return srv.start_yardstick(tmp, what)
    if what == "peer":
        return peers.start_peer(key, args.peers_dir, tmp)
    flags = list(args.serve_arg)
    if what == "workers":
        flags += ["--workers", key.removeprefix("workers")]
    path = baseline_path if what == "baseline" else args.server_pythonpath
    return srv.start_paramserve(key, tmp, path, *flags)


def drive(server: srv.Server, client: str, mode: str, concurrency: int, connections: int,
          duration: float, args) -> dict:
    if client == "perf_analyzer":
        from perf_analyzer import run_perf_analyzer

        return run_perf_analyzer(server.address, server.model, concurrency, duration,
                                 input_name=server.input_name, streaming=mode == "stream",
                                 connections=connections or None)
    if client == "oipload":
        return peers.run_oipload(args.peers_dir, server, concurrency, duration, args.warmup_s)
    return loadgen(server.address, server.model, concurrency, duration, 20, connections)


def measure(server: srv.Server, cell: tuple, duration: float, args) -> dict:
    """One cell, with what the server spent on it: CPU from /proc, counts from statistics
    (the client's count where there are none, or where several workers each count their own)."""
    client, mode, concurrency, connections = cell
    before = srv.statistics(server) if "workers" not in server.name else None
    cpu0, t0 = srv.cpu_s(server.pid), time.monotonic()
    figures = drive(server, client, mode, concurrency, connections, duration, args)
    wall, cpu = time.monotonic() - t0, srv.cpu_s(server.pid) - cpu0
    after = srv.statistics(server) if before is not None else None
    out = {"throughput_rps": figures["throughput_rps"], "p50_ms": figures["p50_ms"],
           "p99_ms": figures["p99_ms"], "server_cpu_s": cpu, "wall_s": wall,
           "cores_busy": cpu / wall}
    if before is not None and after is not None and after[0] > before[0]:
        inferences = after[0] - before[0]
        out["mean_batch"] = inferences / max(1, after[1] - before[1])
    elif "requests" in figures:  # oipload counts its windows only: scale to its whole run
        counted = figures.get("counted_s")
        share = (counted + args.warmup_s) / counted if counted else 1.0
        inferences, out["cpu_estimated"] = figures["requests"] * share, True
    else:
        inferences, out["cpu_estimated"] = figures["throughput_rps"] * wall, True
    out["inferences"] = inferences
    out["cpu_us_per_inf"] = cpu / max(1, inferences) * 1e6
    return out


def run_job(key, what, cells, args, tmp, baseline_path, record, info) -> None:
    reason = skip_reason(key, what, args)
    if reason:
        for cell in cells:
            record(key, cell, {"not_run": reason})
        return
    try:
        server = start(key, what, args, tmp, baseline_path)
    except Exception as err:  # noqa: BLE001  a server that does not start: its rows say why
        for cell in cells:
            record(key, cell, {"not_run": f"did not start: {str(err)[:200]}"})
        return
    try:
        error = srv.check_outputs(server)
        info.setdefault(key, {"notes": server.notes})
        info[key].update({"address": server.address, "loop": server.loop(),
                          "max_abs_error": error})
        info[key].setdefault("load_average_at_start", []).append(os.getloadavg()[0])
        warmed = False
        for cell in cells:
            why = client_reason(cell[0], server, args)
            if why:
                record(key, cell, {"not_run": why})
                continue
            try:
                if not warmed:  # discarded: the first calls load, connect, warm caches
                    drive(server, cell[0], "unary", 4, cell[3], min(2.0, args.duration_s), args)
                    warmed = True
                record(key, cell, measure(server, cell, args.duration_s, args))
            except Exception as err:  # noqa: BLE001
                record(key, cell, {"not_run": f"failed: {str(err)[:300]}"})
    except Exception as err:  # noqa: BLE001
        for cell in cells:
            record(key, cell, {"not_run": f"failed: {str(err)[:300]}"})
    finally:
        server.stop()


def median_cells(samples: dict) -> dict:
    """{cell: median figures over its rounds} ("not run" when no round measured it)."""
    out = {}
    for cell, runs in samples.items():
        good = [r for r in runs if "not_run" not in r]
        if not good:
            out[cell] = {"not_run": runs[-1]["not_run"], "rounds": 0}
            continue
        merged = {k: stat.median(r[k] for r in good) for k in good[0]
                  if isinstance(good[0][k], (int, float)) and not isinstance(good[0][k], bool)
                  and all(k in r for r in good)}
        merged["rounds"] = len(good)
        merged["cpu_estimated"] = any(r.get("cpu_estimated") for r in good)
        out[cell] = merged
    return out


def cell_table(cells: dict, labels: dict) -> str:
    header = ["server", "client", "mode", "c", "infer/s", "p50 ms", "p99 ms", "CPU µs/inf",
              "cores", "batch", "rounds"]
    rows = []
    for (key, client, mode, c, conns), m in cells.items():
        name = labels.get(key, key) + (f" ({conns} conn)" if conns else "")
        if "not_run" in m:
            rows.append([name, client, mode, str(c), "not run: " + m["not_run"], *[""] * 6])
            continue
        approx = "≈" if m.get("cpu_estimated") else ""
        rows.append([name, client, mode, str(c), f"{m['throughput_rps']:.0f}",
                     f"{m['p50_ms']:.2f}", f"{m['p99_ms']:.2f}",
                     f"{approx}{m['cpu_us_per_inf']:.0f}", f"{m['cores_busy']:.2f}",
                     f"{m['mean_batch']:.2f}" if "mean_batch" in m else "-",
                     str(m["rounds"])])
    return format_table(header, rows)


def target_rows(cells: dict, info: dict, quick: bool) -> list[dict]:
    """The targets, each a ratio of two cells of this run; None where a side was not run."""
    rows: list[dict] = []

    def get(key, client, mode, c, figure="throughput_rps", conns=0):
        m = cells.get((key, client, mode, c, conns), {})
        return m.get(figure), m.get("not_run")

    top = 4 if quick else 16

    def add(name, ours, floor, target, judge, unit):
        """``floor`` None: a figure judged alone; else the ratio ours ÷ floor is judged."""
        (a, why_a), (b, why_b) = ours, floor or (None, None)
        row = {"benchmark": name, "unit": unit, "target": target, "floor": "-", "ratio": None,
               "figure": "not run", "met": None}
        if a is None or (floor and b is None):
            row["target"] += f" (not run: {(why_a if a is None else why_b) or 'no figure'})"
            if floor:
                row["floor"] = "not run" if b is None else round(b, 2)
        else:
            ratio = round(a / b, 3) if floor else None
            row.update(figure=round(a, 2), floor=round(b, 2) if floor else "-", ratio=ratio)
            row["met"] = None if quick else judge(a if ratio is None else ratio)
        rows.append(row)

    ps = ("paramserve", "perf_analyzer")
    add(f"1. mean executed batch, paramserve unary c{top}", get(*ps, "unary", top, "mean_batch"),
        None, "≥ 4", lambda x: x >= 4, "rows")
    add(f"1. CPU per inference c{top} vs baseline", get(*ps, "unary", top, "cpu_us_per_inf"),
        get("baseline", "perf_analyzer", "unary", top, "cpu_us_per_inf"), "≤ 0.6× baseline",
        lambda r: r <= 0.6, "µs")
    add("1. c1 p50 latency vs baseline", get(*ps, "unary", 1, "p50_ms"),
        get("baseline", "perf_analyzer", "unary", 1, "p50_ms"), "≤ 1.1× baseline",
        lambda r: r <= 1.1, "ms")
    loop = info.get("paramserve", {}).get("loop", "uvloop")
    other = "asyncio" if loop == "uvloop" else "uvloop"
    add(f"2. unary c{top} vs yardstick on {loop} (paramserve's loop)", get(*ps, "unary", top),
        get(f"yardstick-{loop}", "perf_analyzer", "unary", top), "≥ 1.1× yardstick",
        lambda r: r >= 1.1, "infer/s")
    add(f"2. unary c{top} vs yardstick on {other} (not paramserve's loop)",
        get(*ps, "unary", top), get(f"yardstick-{other}", "perf_analyzer", "unary", top),
        "diagnostic", lambda r: None, "infer/s")
    add(f"2. unary c{top} vs Triton (beside)", get(*ps, "unary", top),
        get("triton-raw", "perf_analyzer", "unary", top), "diagnostic", lambda r: None,
        "infer/s")
    add("2. unary c1 vs Triton", get(*ps, "unary", 1),
        get("triton-raw", "perf_analyzer", "unary", 1), "≥ 1.0× Triton", lambda r: r >= 1.0,
        "infer/s")
    modes = {m: get("triton-raw", "perf_analyzer", m, top) for m in ("unary", "stream")}
    better = max((m for m in modes if modes[m][0] is not None),
                 key=lambda m: modes[m][0], default="unary")
    add(f"3. streaming c{top} vs Triton's better mode ({better})", get(*ps, "stream", top),
        modes[better], "≥ 1.0× Triton", lambda r: r >= 1.0, "infer/s")
    for peer in ("mlserver-nobatch", "kserve"):
        for c in (4,) if quick else (4, 16):
            add(f"4. oipload c{c} vs {peer}", get("paramserve", "oipload", "unary", c),
                get(peer, "oipload", "unary", c), "≥ 1.5×", lambda r: r >= 1.5, "infer/s")
    client = "perf_analyzer"
    one, two = (get(f"workers{n}", client, "unary", top, conns=n) for n in (1, 2))
    if one[0] is None or two[0] is None:  # no perf_analyzer here: the Python client's cells
        client = "loadgen"
        one, two = (get(f"workers{n}", client, "unary", top, conns=n) for n in (1, 2))
    add(f"6. --workers 2 (2 connections) vs --workers 1 (1), c{top}, {client}", two, one,
        "> 1.0× (scales with cores)", lambda r: r > 1.0, "req/s")
    cores = min(2, len(os.sched_getaffinity(0)))
    per_core = (None if two[0] is None else two[0] / cores, two[1])
    add(f"6. per-core figure, --workers 2 ÷ {cores} cores", per_core, None,
        "stated (the load client shares the cores)", lambda x: None, "req/s per core")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-pythonpath", metavar="DIR",
                        help="PYTHONPATH importing the paramserve under test (default: the "
                             "importable one)")
    parser.add_argument("--baseline-rev", metavar="REV", help="also measure this commit")
    parser.add_argument("--peers-dir", type=Path, default=peers.DEFAULT_DIR)
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", "2")))
    parser.add_argument("--duration-s", type=float, default=9.0,
                        help="per cell: 3 windows of a third of it (default 3×3 s)")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="oipload's warm-up")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="an extra flag for the tree under test's serve (repeatable), "
                             "e.g. --serve-arg=--max-queue-delay-us=100")
    parser.add_argument("--only", metavar="KEY[,KEY]",
                        help="serve only these (prefixes of yardstick-uvloop, yardstick-asyncio, "
                             "paramserve, baseline, triton-raw, mlserver-nobatch, kserve, "
                             "workers1, workers2); the other rows say not run")
    parser.add_argument("--quick", action="store_true",
                        help="a short pass proving the suite runs: c1/c4, no peers/baseline")
    parser.add_argument("--out", help="JSON path (.txt beside it); default benchmarks/results/"
                                      "throughput-Ncore.json, --quick: in the temp dir")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration_s, args.warmup_s = 1, 0.6, 0.2
    cores = len(os.sched_getaffinity(0))
    default = (Path(tempfile.gettempdir()) / "paramserve-throughput-quick.json" if args.quick
               else HERE / "results" / f"throughput-{cores}core.json")
    out = Path(args.out) if args.out else default
    jobs = plan(args)
    samples: dict = {}
    info: dict = {}

    def record(key, cell, figures):
        samples.setdefault((key, *cell), []).append(figures)
        shown = figures.get("not_run") or f"{figures['throughput_rps']:.0f}/s"
        print(f"[throughput] {key} {' '.join(map(str, cell))}: {shown}", flush=True)

    labels = {"paramserve": f"paramserve {srv.tree_label(args.server_pythonpath)}"}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="paramserve-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        baseline, args.baseline_error = None, None
        if args.baseline_rev and not args.quick:
            try:
                baseline = srv.BaselineTree(args.baseline_rev, args.server_pythonpath,
                                            tmp).__enter__()
                labels["baseline"] = baseline.label()
            except (subprocess.CalledProcessError, OSError) as err:
                stderr = getattr(err, "stderr", b"") or b""
                args.baseline_error = f"no worktree of {args.baseline_rev}: " + (
                    stderr.decode(errors="replace").strip()[-200:] or str(err))
                baseline = None
        try:
            for _ in range(args.rounds):
                for key, what, cells in jobs:
                    run_job(key, what, cells, args, tmp, baseline and baseline.pythonpath,
                            record, info)
        finally:
            if baseline is not None:
                baseline.__exit__(None, None, None)
    cells = median_cells(samples)
    rows = target_rows(cells, info, args.quick)
    for key, meta in info.items():
        labels.setdefault(key, key)
        if meta.get("loop") and key.startswith(("paramserve", "baseline", "workers")):
            labels[key] += f" [{meta['loop']}]"
    table = format_table(["target", "figure", "floor", "ratio", "target / why", "met"], [
        [r["benchmark"], f"{r['figure']} {r['unit']}" if r["figure"] != "not run" else
         "not run", str(r["floor"]), "-" if r["ratio"] is None else str(r["ratio"]),
         r["target"], MET[r["met"]]] for r in rows])
    text = cell_table(cells, labels) + "\n" + table
    figures = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
               "servers": {k: {"label": labels.get(k, k), **v} for k, v in info.items()},
               "cells": [{"server": k[0], "client": k[1], "mode": k[2], "concurrency": k[3],
                          "connections": k[4], **m} for k, m in cells.items()],
               "rows": rows, "wall_s": round(time.monotonic() - started, 1)}
    m = figures["machine"]
    label = (f"issue #16 throughput, {m['cores']} cores ({m['cpu']}), rounds {args.rounds}, "
             f"{args.duration_s:g} s per cell{' (--quick: nothing judged)' if args.quick else ''}")
    write_results(out, label, text, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
