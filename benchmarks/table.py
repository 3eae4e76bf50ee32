"""The plain-text table every benchmark prints (and saves beside its JSON). Standard library
only: cli_startup.py, which must import nothing heavy, uses it too."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

MET = {True: "yes", False: "NO", None: "-"}


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns left-aligned to their widest cell, a rule under the header."""
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip()
                     for line in [header, ["-" * w for w in widths], *rows]) + "\n"


def write_results(out: str | Path, label: str, table: str, figures: dict) -> None:
    """Print the table under its label and save it (``.txt``) beside the figures (JSON)."""
    print(f"{label}\n\n{table}")
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".txt").write_text(f"{label}\n\n{table}")
    out_path.write_text(json.dumps(figures, indent=2))
    print(f"wrote {out_path}")


def machine() -> dict:
    """What a results file says of the machine it was measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) // 1024 for line in open("/proc/meminfo")
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_mib": mem,
            "python": platform.python_version(), "load_average": list(os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
