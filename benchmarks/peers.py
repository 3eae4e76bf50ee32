"""The peers (Triton 2.51, MLServer, KServe serving the same seed-0 MLP; ../shared/peers,
installed as /tmp/peers) started one at a time from their own recipes (run_all.py's
flavours: command, environment, ports), and their Python OIP load client, oipload.py.

Nothing here is needed to run the project's own benchmarks: without the peers, every row
that needs them says "not run" and why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from servers import Server, wait_ready

DEFAULT_DIR = Path("/tmp/peers")
INPUT_NAME = "INPUT__0"  # the peers' tensor names (paramserve's are input/output)


def _run_all(peers_dir: Path):
    spec = importlib.util.spec_from_file_location("peers_run_all", peers_dir / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def client_python(peers_dir: Path) -> Path:
    """The Triton peer's venv Python: it has tritonclient, which oipload.py imports."""
    return peers_dir / "triton" / "venv" / "bin" / "python"


def unavailable(peers_dir: Path, flavour: str | None = None) -> str | None:
    """None when the peers (and ``flavour``) can run from ``peers_dir``; else why not."""
    if not (peers_dir / "run_all.py").is_file():
        return f"no peers in {peers_dir} (cp -r ../shared/peers /tmp/peers, or --peers-dir)"
    if not client_python(peers_dir).exists():
        return f"{client_python(peers_dir)} missing: the peers are not installed (run_all.sh)"
    if flavour is not None:
        recipe = _run_all(peers_dir).flavours().get(flavour)
        if recipe is None:
            return f"{flavour} is not one of the peers' flavours"
        if not Path(recipe["cmd"][0]).exists():
            return f"{flavour} not installed ({recipe['cmd'][0]} missing)"
    return None


def start_peer(flavour: str, peers_dir: Path, tmp: Path) -> Server:
    """Start one peer alone, as its recipe says; wait until mlp_small is ready."""
    run_all = _run_all(peers_dir)
    recipe = run_all.flavours()[flavour]
    busy = [p for p in recipe["ports"] if run_all.port_busy(p)]
    if busy:
        raise RuntimeError(f"port(s) {busy} already in use on 127.0.0.1: not starting {flavour}")
    log = open(tmp / f"{flavour}.log", "w")
    proc = subprocess.Popen([str(c) for c in recipe["cmd"]], env=dict(os.environ, **recipe["env"]),
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    server = Server(flavour, f"127.0.0.1:{recipe['port']}", proc.pid,
                    lambda: run_all.stop(proc), input_name=INPUT_NAME)
    server.notes.append(recipe["desc"])
    try:
        wait_ready(server, proc)
        server.model_config = has_model_config(server)
    except BaseException:
        run_all.stop(proc)
        raise
    return server


def has_model_config(server: Server) -> bool:
    import grpc

    from paramserve.protos import inference_pb2 as pb
    from paramserve.protos import inference_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelConfig(pb.ModelConfigRequest(name=server.model), timeout=10)
            return True
        except grpc.RpcError:
            return False


def run_oipload(peers_dir: Path, server: Server, concurrency: int, duration_s: float,
                warmup_s: float) -> dict:
    """oipload.py (closed loop, one channel per 6 requests as tritonclient shares them):
    ``warmup_s`` discarded, then 3 windows of ``duration_s``/3."""
    window_ms = max(100, round(duration_s * 1000 / 3))
    with tempfile.TemporaryDirectory(prefix="oipload-") as tmp:
        out = Path(tmp) / "out.json"
        args = [str(client_python(peers_dir)), "-B", str(peers_dir / "common" / "oipload.py"),
                "--url", server.address, "-m", server.model, "-c", str(concurrency),
                "-p", str(window_ms), "-r", "3", "--warmup-ms", str(round(warmup_s * 1000)),
                "--json", str(out)]
        started = time.monotonic()
        p = subprocess.run(args, capture_output=True, text=True, timeout=duration_s + 180)
        if not out.exists():
            tail = " | ".join((p.stdout + p.stderr).strip().splitlines()[-2:])
            raise RuntimeError(f"oipload exited {p.returncode}: {tail[:300]}")
        figures = json.loads(out.read_text())
    if figures["errors"]:
        raise RuntimeError(f"oipload RPC errors: {figures['errors']}")
    return {"throughput_rps": figures["infer_per_s"], "p50_ms": figures["p50_ms"],
            "p99_ms": figures["p99_ms"], "requests": figures["requests"],
            "counted_s": 3 * window_ms / 1000, "wall_s": time.monotonic() - started}
