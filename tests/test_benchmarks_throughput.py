"""benchmarks/throughput.py --quick runs end to end (no figure asserted: CI's machines are
noisy): every target row and every server's cells are in its JSON, measured or "not run"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_quick_pass_writes_every_row(tmp_path):
    out = tmp_path / "throughput.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"),
                             "--quick", "--peers-dir", str(tmp_path / "no-peers"),
                             "--out", str(out)], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["machine"]["cores"] >= 1
    targets = [row["benchmark"][:2] for row in figures["rows"]]
    assert {"1.", "2.", "3.", "4.", "6."} <= set(targets)
    assert all(row["met"] is None for row in figures["rows"])  # --quick judges nothing
    cells = {(c["server"], c["client"], c["mode"], c["concurrency"]): c
             for c in figures["cells"]}
    # the servers that need nothing but this checkout were measured (the clients may be absent)
    for server in ("yardstick-uvloop", "yardstick-asyncio", "paramserve"):
        assert (server, "perf_analyzer", "unary", 1) in cells
    for server in ("workers1", "workers2"):
        cell = cells[(server, "loadgen", "unary", 4)]
        assert cell["throughput_rps"] > 0 and cell["cpu_us_per_inf"] > 0, cell
    assert "no peers" in cells[("triton-raw", "perf_analyzer", "unary", 1)]["not_run"]
    assert out.with_suffix(".txt").read_text().startswith("issue #16 throughput")
