"""paramserve's benchmark suite: every figure beside a floor measured in the same run.

    python benchmarks/run.py [--quick] [--duration-s 5] [--out benchmarks/results/NAME.json]

Prints a table and writes JSON describing the machine, and a plot of throughput against
concurrency beside it (with matplotlib). Targets are ratios to the floors
(these machines are noisy; absolute numbers are not comparable across runs):
  infer-small  sequential_mlp 20→256→10, batch 1, c=1/4/16/64 from a separate process, vs a
               bare gRPC echo server: ≥ 0.8× echo throughput at c16 and c64; p50 at c1 ≤ echo
               p50 + in-process forward + 0.15 ms; the same with --workers 2 against two echo
               processes on one port; Triton's perf_analyzer against us at c1/c16, a
               diagnostic (Triton itself runs beside us in benchmarks/throughput.py; bash
               benchmarks/setup-perf-analyzer.sh makes its binary loadable; else "not run")
  infer-stream the same load as messages of one ModelStreamInfer stream (c16/c64, Python
               load generator), and perf_analyzer --streaming at c16: ≥ 1.0× unary
  infer-wide   1024→4096→1024 at c16 vs an in-process forward at the batch size the batcher
               reached: ≥ 0.85× throughput
  transfer     upload/download of 100 MiB and 1 GiB vs bare gRPC streaming of the same bytes in
               the same chunks (medians of 3 rounds, ours and the floor alternating): ≥ 0.8×
               MB/s; server RSS growth ≤ 64 MiB
  cold-start   first request to a stored, unloaded 1 GiB model vs safetensors load + build +
               move to device: ≤ 1.2×
  registry     alias resolution and version listing with 10,000 models / 100,000 versions vs
               10 models: p50 ≤ 2×
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # perf_analyzer.py, plot.py, table.py
from table import MET  # noqa: E402
from table import format_table as table_text  # noqa: E402

HERE = Path(__file__).resolve().parent
MIB = 1 << 20


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) // 1024 for line in open("/proc/meminfo")
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": mem, "python":
            platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


class Proc:
    """A server subprocess on 127.0.0.1 with a free port; stopped by ``stop()`` or at exit."""

    def __init__(self, args: list[str], port_from_stdout: bool = True, port_file=None,
                 env: dict | None = None):
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        if port_from_stdout:
            ready, _, _ = select.select([self.proc.stdout], [], [], 120)
            line = self.proc.stdout.readline() if ready else ""
            self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        else:
            deadline = time.monotonic() + 60
            while not (Path(port_file).exists() and Path(port_file).read_text()):
                if time.monotonic() > deadline:
                    raise RuntimeError("floor server did not start")
                time.sleep(0.05)
            self.port = int(Path(port_file).read_text())
        self.address = f"127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def loadgen(address: str, model: str, concurrency: int, duration_s: float, width: int,
            channels: int = 1, mode: str = "unary") -> dict:
    out = subprocess.run([sys.executable, str(HERE / "loadgen.py"), address, model,
                          str(concurrency), str(duration_s), str(width), str(channels), mode],
                         capture_output=True, text=True, check=True, timeout=duration_s + 120)
    return json.loads(out.stdout)


def p50_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row(rows, name, figure, floor, ratio, target, met, unit=""):
    rows.append({"benchmark": name, "figure": figure, "floor": floor, "ratio": ratio,
                 "target": target, "met": met, "unit": unit})


SMALL_CONCURRENCY = (1, 4, 16, 64)
WIDE_CONFIG = {"in_features": 1024, "hidden": 4096, "out_features": 1024}


def serve_proc(data_dir: Path, *flags: str, env: dict | None = None) -> Proc:
    """``paramserve serve`` on a free loopback port, metrics and HTTP off (two servers of one
    run would both want HTTP's default port); ``env``: e.g. a PYTHONPATH naming another tree."""
    return Proc([sys.executable, "-m", "paramserve.service.cli", "serve", "--data-dir",
                 str(data_dir), "--listen", "127.0.0.1:0", "--metrics-listen", "off",
                 "--http-listen", "off", *flags], env=env)


def floor_proc(port_file: Path, join_port: int | None = None, *flags: str) -> Proc:
    """The echo/streaming floor (floors.py); ``join_port``: share an existing floor's port;
    ``flags``: floors.py's options (``--inference yardstick``, ``--loop uvloop``)."""
    extra = [] if join_port is None else [str(join_port)]
    return Proc([sys.executable, str(HERE / "floors.py"), str(port_file), *extra, *flags],
                port_from_stdout=False, port_file=port_file)


def add_mlp(client, name: str, config: dict | None = None):
    """Create ``name`` as a sequential_mlp and upload seed-0 parameters; returns the module."""
    from paramserve.registry import get_architecture

    module = get_architecture("sequential_mlp").build(config or {}, seed=0)
    client.create_model(name, "sequential_mlp", config)
    client.upload(name, module.state_dict())
    return module


def bench_infer_small(client, server, floor, rows, duration_s):
    module = add_mlp(client, "bench-small")
    x = torch.rand(1, 20)
    with torch.inference_mode():
        forward_s = p50_s(lambda: module(x), 2000)
    results = compare_with_echo(server, floor, rows, duration_s, SMALL_CONCURRENCY)
    ours, echo = results[1]
    budget = echo["p50_ms"] + forward_s * 1000 + 0.15
    row(rows, "infer-small c1 p50 latency", round(ours["p50_ms"], 3),
        f"echo {echo['p50_ms']:.3f} + fwd {forward_s * 1000:.3f} + 0.15",
        round(ours["p50_ms"] / budget, 3), "≤ 1.0× budget", ours["p50_ms"] <= budget, "ms")
    return {str(c): {"paramserve": o, "echo": e} for c, (o, e) in results.items()} | {
        "in_process_forward_p50_ms": forward_s * 1000}


def compare_with_echo(server, floor, rows, duration_s, levels, label="", channels=None):
    """ModelInfer of bench-small at each concurrency, against the echo floor, same load."""
    results = {}
    for concurrency in levels:
        spread = channels(concurrency) if channels else 1
        ours = loadgen(server.address, "bench-small", concurrency, duration_s, 20, spread)
        echo = loadgen(floor.address, "bench-small", concurrency, duration_s, 20, spread)
        results[concurrency] = (ours, echo)
        ratio = ours["throughput_rps"] / echo["throughput_rps"]
        judged = concurrency in (16, 64)
        row(rows, f"infer-small{label} c{concurrency} throughput", round(ours["throughput_rps"]),
            round(echo["throughput_rps"]), round(ratio, 3), "≥ 0.8× echo" if judged else "-",
            ratio >= 0.8 if judged else None, "req/s")
    return results


STREAM_CONCURRENCY = (16, 64)


def bench_stream(server, rows, duration_s, unary: dict):
    """The same load as infer-small, every request a message on one ModelStreamInfer stream,
    beside the unary figure at the same concurrency (a stream saves a call per request)."""
    results = {}
    for concurrency in STREAM_CONCURRENCY:
        ours = loadgen(server.address, "bench-small", concurrency, duration_s, 20, 1, "stream")
        base = unary[str(concurrency)]["paramserve"]["throughput_rps"]
        ratio = ours["throughput_rps"] / base
        results[str(concurrency)] = ours
        row(rows, f"infer-small stream c{concurrency} throughput", round(ours["throughput_rps"]),
            f"unary {round(base)}", round(ratio, 3), "≥ 1.0× unary", ratio >= 1.0, "req/s")
    return results


def bench_workers(rows, tmp: Path, duration_s, workers: int = 2):
    """``serve --workers N`` against N echo processes sharing a port, load over 16 connections
    (SO_REUSEPORT balances connections, so one connection would reach one worker)."""
    from paramserve.service.client import Client

    server = serve_proc(tmp / "data-workers", "--workers", str(workers),
                        "--sync-interval-s", "0.2")
    floors = [floor_proc(tmp / "floors.port")]
    try:
        floors += [floor_proc(tmp / f"floors{i}.port", floors[0].port)
                   for i in range(1, workers)]
        with Client(server.address) as client:
            add_mlp(client, "bench-small")
        time.sleep(1)  # every worker has seen the new model
        results = compare_with_echo(server, floors[0], rows, duration_s, (4, 16, 64),
                                    f" --workers {workers}", channels=lambda c: min(c, 16))
    finally:
        server.stop()
        for floor in floors:
            floor.stop()
    return {str(c): {"paramserve": o, "echo": e} for c, (o, e) in results.items()}


def bench_torch_threads(rows, tmp: Path, duration_s, default_small, default_wide):
    """The --torch-threads default against giving torch every core, same loads: the data
    behind the default (the load generator shares the host, as it does in every row here)."""
    from paramserve.service.client import Client
    from paramserve.service.config import ServerConfig, available_cores, torch_threads_for

    every_core = available_cores()
    default = torch_threads_for(ServerConfig())
    if every_core == default:
        return {}
    server = serve_proc(tmp / "data-threads", "--torch-threads", str(every_core))
    try:
        with Client(server.address) as client:
            add_mlp(client, "bench-small")
            add_mlp(client, "bench-wide", WIDE_CONFIG)
        small = loadgen(server.address, "bench-small", 16, duration_s, 20)
        wide_run = loadgen(server.address, "bench-wide", 16, duration_s, 1024)
    finally:
        server.stop()
    for label, ours, alt in (("infer-small c16", default_small, small),
                             ("infer-wide c16", default_wide, wide_run)):
        row(rows, f"{label}: --torch-threads {default} (default) vs {every_core}",
            round(ours["throughput_rps"]), round(alt["throughput_rps"]),
            round(ours["throughput_rps"] / alt["throughput_rps"], 3), "diagnostic", None,
            "req/s")
    return {"default": default, "every_core": every_core, "small_c16": small,
            "wide_c16": wide_run}


PERF_ANALYZER_CONCURRENCY = (1, 16)


def bench_perf_analyzer(server, rows, duration_s):
    """Triton's own load generator against us. No ratio to Triton here: a figure only counts
    beside one from the same run, and benchmarks/throughput.py runs Triton beside us."""
    from perf_analyzer import run_perf_analyzer, unavailable_reason

    reason = unavailable_reason()
    if reason:
        row(rows, "perf_analyzer", "not run", "-", None, reason, None)
        return {"not_run": reason}
    results = {}
    for concurrency in PERF_ANALYZER_CONCURRENCY:
        figures = run_perf_analyzer(server.address, "bench-small", concurrency, duration_s)
        results[str(concurrency)] = figures
        row(rows, f"perf_analyzer c{concurrency} throughput", round(figures["throughput_rps"]),
            "-", None, "diagnostic (Triton beside it: throughput.py)", None, "infer/s")
    return results


def bench_perf_analyzer_streaming(server, rows, duration_s, unary: dict):
    """perf_analyzer --streaming at c16 (one ModelStreamInfer stream per concurrent context)
    beside its own unary figure."""
    if "not_run" in unary:
        row(rows, "perf_analyzer --streaming", "not run", "-", None, unary["not_run"], None)
        return {"not_run": unary["not_run"]}
    from perf_analyzer import run_perf_analyzer

    figures = run_perf_analyzer(server.address, "bench-small", 16, duration_s, streaming=True)
    base = unary["16"]["throughput_rps"]
    ratio = figures["throughput_rps"] / base
    row(rows, "perf_analyzer --streaming c16 throughput", round(figures["throughput_rps"]),
        f"unary {round(base)}", round(ratio, 3), "≥ 1.0× unary", ratio >= 1.0, "infer/s")
    return {"16": figures}


def bench_infer_wide(client, server, rows, duration_s):
    from paramserve.protos import inference_pb2 as pb
    from paramserve.protos import inference_pb2_grpc

    module = add_mlp(client, "bench-wide", WIDE_CONFIG)
    ours = loadgen(server.address, "bench-wide", 16, duration_s, 1024)
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(client.channel)
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="bench-wide")).model_stats[0]
    batch = max(1, round(stats.inference_count / max(1, stats.execution_count)))
    xb = torch.rand(batch, 1024)
    with torch.inference_mode():
        forward_s = p50_s(lambda: module(xb), 50)
    in_process_rps = batch / forward_s
    ratio = ours["throughput_rps"] / in_process_rps
    row(rows, "infer-wide c16 throughput", round(ours["throughput_rps"]), round(in_process_rps),
        round(ratio, 3), "≥ 0.85× in-process", ratio >= 0.85, f"rows/s (batch {batch})")
    # Where the gap is: the server's own forwards at the batch size nearest the mean (timed
    # around the module call, from ModelStatistics) against the same forward here, idle.
    common = min(stats.batch_stats, key=lambda b: abs(b.batch_size - batch))
    in_server_ms = common.compute_infer.ns / common.compute_infer.count / 1e6
    with torch.inference_mode():
        alone_ms = p50_s(lambda: module(torch.rand(common.batch_size, 1024)), 50) * 1000
    row(rows, f"infer-wide forward inside the server, batch {common.batch_size}",
        round(in_server_ms, 2), round(alone_ms, 2), round(in_server_ms / alone_ms, 3),
        "diagnostic", None, "ms")
    return {"paramserve": ours, "mean_batch": batch, "in_process_rows_per_s": in_process_rps,
            "batch_sizes": {b.batch_size: b.compute_infer.count for b in stats.batch_stats},
            "forward_in_server_ms": in_server_ms, "forward_in_process_ms": alone_ms,
            "forward_batch": common.batch_size}


def sample_peak_rss(server, stop: threading.Event, out: list) -> None:
    peak = 0
    while not stop.is_set():
        peak = max(peak, server.rss_bytes())
        time.sleep(0.01)
    out.append(peak)


def measure_rss(server, fn):
    base = server.rss_bytes()
    stop, out = threading.Event(), []
    sampler = threading.Thread(target=sample_peak_rss, args=(server, stop, out))
    sampler.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        elapsed = time.perf_counter() - start
        stop.set()
        sampler.join()
    return result, elapsed, max(0, out[0] - base)


TRANSFER_ROUNDS = 3


def bench_transfer(client, server, floor, rows, size_mib, tmp: Path):
    from paramserve.protos import registry_pb2 as rpb
    from paramserve.protos import registry_pb2_grpc
    from paramserve.registry import get_architecture
    from paramserve.registry.tensorfile import write_tensors
    from paramserve.service.client import Client, _size_and_sha256, _upload_chunks

    hidden = max(1, size_mib * MIB // (8 * 1024))
    config = {"in_features": 1024, "hidden": hidden, "out_features": 1024}
    name = f"bench-{size_mib}mib"
    path = tmp / f"{name}.safetensors"
    module = get_architecture("sequential_mlp").build(config, device="meta").to_empty(
        device="cpu")
    for p in module.parameters():
        p.data.normal_()
    with open(path, "wb") as f:
        write_tensors(f, list(module.state_dict().items()))
    del module
    size = path.stat().st_size
    client.create_model(name, "sequential_mlp", config)
    stub = registry_pb2_grpc.RegistryStub(client.channel)
    floor_stub = registry_pb2_grpc.RegistryStub(Client(floor.address).channel)
    header = rpb.UploadHeader(model=name, sha256=_size_and_sha256(path)[1], size_bytes=size)

    def floor_upload():
        floor_stub.UploadVersion(_upload_chunks(path, header, None))

    def floor_download():
        with open(tmp / "floor.bin", "wb") as out:
            for chunk in floor_stub.DownloadVersion(rpb.DownloadVersionRequest(ref=str(size))):
                out.write(chunk.data)

    # ours and the floor alternate, ROUNDS times: this box is shared, so one pass of each
    # compares two different moments; the medians compare the same ones
    times: dict[str, list[float]] = {"up": [], "down": [], "floor_up": [], "floor_down": []}
    up_rss = down_rss = 0
    for _ in range(TRANSFER_ROUNDS):
        version, up_s, rss = measure_rss(server, lambda: client.upload(name, path))
        times["up"].append(up_s)
        up_rss = max(up_rss, rss)
        times["floor_up"].append(p50_s(floor_upload, 1))
        _, down_s, rss = measure_rss(server, lambda: client.download(
            name, version.number, tmp / "back.safetensors"))
        times["down"].append(down_s)
        down_rss = max(down_rss, rss)
        (tmp / "back.safetensors").unlink()
        times["floor_down"].append(p50_s(floor_download, 1))
        (tmp / "floor.bin").unlink()
    up_s, down_s, floor_up_s, floor_down_s = (statistics.median(times[k]) for k in (
        "up", "down", "floor_up", "floor_down"))
    for label, ours_s, floor_s, rss in (("upload", up_s, floor_up_s, up_rss),
                                         ("download", down_s, floor_down_s, down_rss)):
        mbps, floor_mbps = size / MIB / ours_s, size / MIB / floor_s
        row(rows, f"transfer {label} {size_mib} MiB", round(mbps, 1), round(floor_mbps, 1),
            round(mbps / floor_mbps, 3), "≥ 0.8× stream", mbps / floor_mbps >= 0.8, "MiB/s")
        row(rows, f"transfer {label} {size_mib} MiB server RSS growth", round(rss / MIB, 1),
            "-", None, "≤ 64 MiB", rss <= 64 * MIB, "MiB")
    del stub
    return {"size_bytes": size, "upload_s": up_s, "download_s": down_s, "rounds": times,
            "floor_upload_s": floor_up_s, "floor_download_s": floor_down_s,
            "upload_rss_growth": up_rss, "download_rss_growth": down_rss,
            "model": name, "config": config, "sha256": version.sha256, "path": str(path)}


COLD_START_ROUNDS = 3


def bench_cold_start(client, server, rows, transfer: dict, data_dir: Path):
    """The first request to an unloaded model against safetensors load + build + move, each
    side from a blob out of the page cache (the transfers before it leave it cached or not,
    depending on their order), alternated over COLD_START_ROUNDS rounds, medians compared."""
    from paramserve.protos import inference_pb2 as pb
    from paramserve.protos import inference_pb2_grpc
    from paramserve.registry import get_architecture
    from safetensors.torch import load_file

    stub = inference_pb2_grpc.GRPCInferenceServiceStub(client.channel)
    name = transfer["model"]
    x = torch.rand(1, 1024)
    blob = next((data_dir / "blobs" / "sha256").rglob(f"{transfer['sha256']}*"))

    def ours():
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name))
        _evict(blob)
        start = time.perf_counter()
        client.infer(name, x)
        return time.perf_counter() - start

    def floor():
        _evict(blob)
        start = time.perf_counter()
        state = load_file(str(blob))
        module = get_architecture("sequential_mlp").build(transfer["config"])
        module.load_state_dict(state)
        module.to("cuda" if torch.cuda.is_available() else "cpu")
        return time.perf_counter() - start

    ours_times, floor_times = [], []
    for _ in range(COLD_START_ROUNDS):
        ours_times.append(ours())
        floor_times.append(floor())
    ours_s, floor_s = statistics.median(ours_times), statistics.median(floor_times)
    ratio = ours_s / floor_s
    row(rows, f"cold start {transfer['size_bytes'] // MIB} MiB", round(ours_s, 3),
        round(floor_s, 3), round(ratio, 3), "≤ 1.2× load+build", ratio <= 1.2, "s")
    return {"first_request_s": ours_s, "floor_s": floor_s, "rounds": COLD_START_ROUNDS}


def _evict(path: Path) -> None:
    """Drop a file's pages from the page cache (Linux; elsewhere nothing), so a read is cold."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_registry(rows, tmp: Path, models: int, versions_per_model: int):
    from sqlalchemy import insert

    from paramserve.registry import Store
    from paramserve.registry.schema import AliasRow, ModelRow, VersionRow

    def populate(store, count):
        config = {"in_features": 4, "hidden": 8, "out_features": 1}
        with store.engine.begin() as conn:
            conn.execute(insert(ModelRow), [
                {"id": i + 1, "name": f"m{i}", "architecture": "small_mlp", "config": config,
                 "init": "default", "seed": 0, "description": "", "next_version":
                 versions_per_model + 1} for i in range(count)])
            batch = []
            for i in range(count):
                for n in range(1, versions_per_model + 1):
                    batch.append({"model_id": i + 1, "number": n, "sha256": "0" * 64,
                                  "size_bytes": 1, "manifest": [], "origin": "upload"})
                if len(batch) >= 20000:
                    conn.execute(insert(VersionRow), batch)
                    batch = []
            if batch:
                conn.execute(insert(VersionRow), batch)
            conn.execute(insert(AliasRow), [
                {"model_id": i + 1, "name": "production",
                 "version_id": i * versions_per_model + 1} for i in range(count)])

    figures = {}
    for label, count in (("small", 10), ("large", models)):
        with Store(data_dir=tmp / f"registry-{label}") as store:
            populate(store, count)
            target = f"m{count // 2}"
            figures[label] = {
                "resolve_alias_p50_ms": p50_s(lambda: store.resolve(target, "production"),
                                              300) * 1000,
                "list_versions_p50_ms": p50_s(lambda: store.list_versions(target), 300) * 1000}
    for key in ("resolve_alias_p50_ms", "list_versions_p50_ms"):
        ratio = figures["large"][key] / figures["small"][key]
        row(rows, f"registry {key.removesuffix('_p50_ms')} ({models} models, "
                  f"{models * versions_per_model} versions)", round(figures["large"][key], 3),
            round(figures["small"][key], 3), round(ratio, 3), "≤ 2× (10 models)", ratio <= 2,
            "ms p50")
    return figures


def format_table(rows) -> str:
    header = ["benchmark", "figure", "floor", "ratio", "target", "met"]
    table = [[r["benchmark"], f"{r['figure']} {r['unit']}".strip(), str(r["floor"]),
              "-" if r["ratio"] is None else str(r["ratio"]), r["target"],
              MET[r["met"]]] for r in rows]
    return table_text(header, table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short runs, 100 MiB transfers only, 1,000 models")
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--out", default=str(HERE / "results" / "latest.json"),
                        help="the JSON; the table goes beside it as .txt, the plot as .png "
                             "(needs matplotlib: pip install -e '.[bench]')")
    parser.add_argument("--only", choices=("infer", "transfer", "registry"),
                        help="run one group (the JSON then holds only its figures)")
    args = parser.parse_args()
    duration = 2.0 if args.quick else args.duration_s
    from paramserve.service.client import Client

    rows, figures = [], {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="paramserve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # the 1 GiB transfer model has 2^28 elements, over the default --max-init-elements
        server = serve_proc(tmp / "data", "--max-init-elements", str(1 << 29))
        floor = floor_proc(tmp / "floor.port")
        try:
            with Client(server.address, timeout_s=600) as client:
                if args.only in (None, "infer"):
                    figures["infer_small"] = bench_infer_small(client, server, floor, rows,
                                                               duration)
                    figures["infer_small_stream"] = bench_stream(server, rows, duration,
                                                                 figures["infer_small"])
                    figures["perf_analyzer"] = bench_perf_analyzer(server, rows, duration)
                    figures["perf_analyzer_streaming"] = bench_perf_analyzer_streaming(
                        server, rows, duration, figures["perf_analyzer"])
                    figures["infer_wide"] = bench_infer_wide(client, server, rows, duration)
                if args.only in (None, "transfer"):
                    sizes = [100] if args.quick else [100, 1024]
                    figures["transfer"] = [bench_transfer(client, server, floor, rows, s, tmp)
                                           for s in sizes]
                    figures["cold_start"] = bench_cold_start(client, server, rows,
                                                             figures["transfer"][-1],
                                                             tmp / "data")
            if args.only in (None, "infer"):
                figures["infer_small_workers"] = bench_workers(rows, tmp, duration)
                figures["torch_threads"] = bench_torch_threads(
                    rows, tmp, duration, figures["infer_small"]["16"]["paramserve"],
                    figures["infer_wide"]["paramserve"])
            if args.only in (None, "registry"):
                figures["registry"] = bench_registry(rows, tmp, 1000 if args.quick else 10000,
                                                     10)
        finally:
            server.stop()
            floor.stop()
    figures["rows"] = rows
    table = format_table(rows)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".txt").write_text(f"{machine_label(figures)}\n\n{table}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2, default=str))
    print(f"\nwrote {args.out}")
    if "infer_small" in figures:
        from plot import plot_throughput

        png = plot_throughput(throughput_series(figures), str(Path(args.out).with_suffix(".png")),
                              f"sequential_mlp 20→256→10, batch 1 ({machine_label(figures)})")
        if png:
            print(f"wrote {png}")
    return 0


def throughput_series(figures: dict) -> dict:
    """{series: {concurrency: req/s}} for the plot."""
    def pick(results, who):
        return {c: r[who]["throughput_rps"] for c, r in results.items() if isinstance(r, dict)
                and who in r}

    series = {"paramserve": pick(figures["infer_small"], "paramserve"),
              "echo floor": pick(figures["infer_small"], "echo")}
    workers = figures.get("infer_small_workers") or {}
    if workers:
        series["paramserve --workers 2"] = pick(workers, "paramserve")
        series["echo floor ×2 processes"] = pick(workers, "echo")
    analyzer = figures.get("perf_analyzer") or {}
    series["perf_analyzer → paramserve"] = {c: r["throughput_rps"] for c, r in analyzer.items()
                                            if isinstance(r, dict)}
    return series


def machine_label(figures: dict) -> str:
    m = figures["machine"]
    return f"{m['cores']} cores, {m['cpu']}" + (f", {m['cuda']}" if m.get("cuda") else "")


if __name__ == "__main__":
    sys.exit(main())
