"""Upload and download through a server whose blobs are in SeaweedFS (S3), beside the same
server on the local blob directory, in one run.

    python benchmarks/objectstore.py [--sizes 64,256] [--repeat 3] [--out results/NAME.json]

For each size (MiB of float32 parameters) and store: ``Client.upload`` of a canonical
safetensors file (it streams straight into the blob: the local temp file, or an S3 multipart
upload of 8 MiB parts then a server-side copy to its sha256 key) and ``Client.download``
(``as_stored``: the blob's bytes, sha256 checked) of that new version, each timed from the
client. Every upload has new bytes (one element changed), so none is deduplicated. Rows also
give SeaweedFS alone (boto3 ``upload_file``/``download_file`` of the same file) as the floor
of the object store on this box. Both servers use a SQLite registry of their own: the
registry is not what is measured. The stores run on the same machine as the client and the
server (loopback), so the S3 figures are the protocol's and SeaweedFS's cost, not a network's.
Prints a table and writes JSON describing the machine (with its load average: the box is
shared), and the table as .txt.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/seaweed.py: SeaweedFS as the tests run it

from seaweed import SeaweedFS  # noqa: E402
from table import format_table, machine, write_results  # noqa: E402

FLOATS_PER_HIDDEN = 31  # sequential_mlp({"hidden": H}): 20·H + H + 10·H (+ 10) float32 parameters


def start_server(data_dir: Path, *extra: str, env: dict | None = None):
    proc = subprocess.Popen(
        [sys.executable, "-m", "paramserve.service.cli", "serve", "--data-dir", str(data_dir),
         "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--http-listen", "off",
         "--max-init-elements", str(1 << 30), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, **(env or {})})
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, "127.0.0.1:" + line.split("listening on ")[1].split()[0].rsplit(":", 1)[1]


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,256", help="MiB, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each transfer")
    parser.add_argument("--out", default=str(HERE / "results" / "objectstore.json"),
                        help="the JSON; the table goes beside it as .txt")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    import torch

    from paramserve.registry import get_architecture
    from paramserve.service.client import Client
    from paramserve.service.client_files import upload_path

    figures: dict = {"machine": machine(), "repeat": args.repeat, "rows": []}
    with tempfile.TemporaryDirectory(prefix="paramserve-objectstore-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with SeaweedFS(tmp / "seaweed") as weed:
            servers = {
                "local dir": start_server(tmp / "local"),
                "SeaweedFS (S3)": start_server(tmp / "s3", *weed.server_args("bench"),
                                               env=weed.env),
            }
            s3 = weed.client(read_timeout_s=300)
            try:
                for size in sizes:
                    hidden = (size << 20) // (4 * FLOATS_PER_HIDDEN)
                    state = get_architecture("sequential_mlp").build(
                        {"hidden": hidden}, seed=0).state_dict()
                    times: dict[tuple[str, str], list[float]] = {}
                    clients = {n: Client(a, timeout_s=600) for n, (_, a) in servers.items()}
                    name = f"bench-{size}"
                    for client in clients.values():
                        client.create_model(name, "sequential_mlp", {"hidden": hidden})
                    for run in range(args.repeat + 1):  # run 0 warms up, unmeasured
                        for store, client in clients.items():
                            with torch.no_grad():
                                state["0.bias"][0] = float(10 * run + list(clients).index(store))
                            with upload_path(state) as (path, _):
                                nbytes = path.stat().st_size
                                up = timed(client.upload, name, path)
                            out = tmp / "download.safetensors"
                            down = timed(client.download, name, None, out, as_stored=True)
                            out.unlink()
                            if run:
                                times.setdefault((store, "upload"), []).append(up)
                                times.setdefault((store, "download"), []).append(down)
                        with upload_path(state) as (path, _):  # SeaweedFS alone
                            key = f"floor/{size}-{run}"
                            up = timed(s3.upload_file, str(path), weed.bucket, key)
                        out = tmp / "floor.bin"
                        down = timed(s3.download_file, weed.bucket, key, str(out))
                        out.unlink()
                        if run:
                            times.setdefault(("SeaweedFS alone (boto3)", "upload"), []).append(up)
                            times.setdefault(("SeaweedFS alone (boto3)", "download"),
                                             []).append(down)
                    for client in clients.values():
                        client.close()
                    for (store, what), samples in times.items():
                        median = statistics.median(samples)
                        figures["rows"].append({
                            "size_mib": round(nbytes / (1 << 20)), "store": store,
                            "transfer": what, "median_s": median,
                            "mib_per_s": nbytes / (1 << 20) / median, "samples_s": samples})
            finally:
                for proc, _ in servers.values():
                    proc.terminate()
                    proc.wait(60)
    figures["machine"]["load_average_after"] = list(os.getloadavg())
    table = format_table(
        ["MiB", "store", "transfer", "median s", "MiB/s"],
        [[str(r["size_mib"]), r["store"], r["transfer"], f"{r['median_s']:.2f}",
          f"{r['mib_per_s']:.0f}"] for r in figures["rows"]])
    m = figures["machine"]
    label = (f"{m['cores']} cores, {m['cpu']}; load average {m['load_average'][0]:.2f} before, "
             f"{m['load_average_after'][0]:.2f} after; median of {args.repeat}; client, server "
             "and SeaweedFS on one machine (loopback)")
    write_results(args.out, label, table, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
