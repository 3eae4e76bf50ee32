"""Blobs stream: a large state_dict never needs two copies in memory.

Measured in a fresh subprocess (peak RSS is a per-process high-water mark) on a 256 MiB
state_dict: uploading a safetensors file costs a few chunks, loading costs one copy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

MIB = 1 << 20
SIDE = 8192  # an 8192×8192 float32 weight: 256 MiB

ARCH = textwrap.dedent(f'''
    import torch
    from torch import nn
    from paramserve.registry import architecture

    @architecture("big_linear", example_input_shape=(1, {SIDE}), replace=True)
    def big_linear():
        return nn.Linear({SIDE}, {SIDE}, bias=False)
''')

MAKE_FILE = ARCH + textwrap.dedent('''
    import sys
    from paramserve.registry.tensorfile import write_tensors
    weight = torch.arange({n}, dtype=torch.float32).reshape({side}, {side})
    with open(sys.argv[1], "wb") as f:
        write_tensors(f, [("weight", weight)])
''').format(n=SIDE * SIDE, side=SIDE)

MEASURE = ARCH + textwrap.dedent('''
    import json, resource, sys
    from paramserve.registry import Store

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    store = Store(data_dir=sys.argv[2])
    store.create_model("big", "big_linear")
    base = peak_mib()
    version = store.upload("big", sys.argv[1])
    after_upload = peak_mib()
    module = store.load("big")
    after_load = peak_mib()
    ok = module.weight[3, 5].item() == 3 * {side} + 5
    print(json.dumps({{"upload": after_upload - base, "load": after_load - base,
                       "size": version.size_bytes, "ok": ok}}))
''').format(side=SIDE)


def test_upload_and_load_of_a_256_mib_state_dict_stream(tmp_path):
    source = tmp_path / "big.safetensors"
    subprocess.run([sys.executable, "-c", MAKE_FILE, str(source)], check=True)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(source), str(tmp_path / "data")],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    size_mib = SIDE * SIDE * 4 / MIB
    assert result["ok"] and result["size"] > SIDE * SIDE * 4
    assert result["upload"] < 64, f"upload grew peak RSS by {result['upload']:.0f} MiB"
    assert result["load"] < size_mib * 1.25, (
        f"load grew peak RSS by {result['load']:.0f} MiB for a {size_mib:.0f} MiB state_dict")
