#!/usr/bin/env bash
# Make tritonclient 2.51's perf_analyzer binary loadable on a CPU-only Debian machine.
# It links libb64.so.0d (Debian: libb64-0d) and libcudart.so.12 (PyPI:
# nvidia-cuda-runtime-cu12; it only has to load, no GPU is used). Idempotent; runs as root.
# benchmarks/perf_analyzer.py puts the libcudart dir on LD_LIBRARY_PATH for perf_analyzer only.
set -euo pipefail
PY=${PYTHON:-python}

if dpkg-query -W -f='${Status}' libb64-0d 2>/dev/null | grep -q 'install ok installed'; then
    echo "libb64-0d: already installed"
else
    echo "libb64-0d: installing with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >/dev/null
fi

if "$PY" -m pip show -q nvidia-cuda-runtime-cu12 >/dev/null 2>&1; then
    echo "nvidia-cuda-runtime-cu12: already installed"
else
    echo "nvidia-cuda-runtime-cu12: installing with pip"
    "$PY" -m pip install -q nvidia-cuda-runtime-cu12
fi

"$PY" "$(dirname "$0")/perf_analyzer.py" --check
