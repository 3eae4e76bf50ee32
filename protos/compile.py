"""Compile the .proto files into one descriptor set: the build step (setup.py) and
``python -m paramserve.protos`` call this; the installed package only reads its output.

Standard library and grpcio-tools only, since setup.py loads this file by path inside the build
environment, where paramserve itself is not importable.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

PROTO_FILES = (
    "inference.proto",
    "registry.proto",
    "health.proto",
    "reflection_v1alpha.proto",
    "reflection_v1.proto",
)
DESCRIPTOR_SET = "descriptors.binpb"
STAMP = "STAMP"
# protoc sees the sources under this virtual path, which names the files in the pool.
IMPORT_PATH = "paramserve/protos"


def source_stamp(proto_dir: Path) -> str:
    """The sources' hash: written beside the descriptor set, checked when it is loaded."""
    digest = hashlib.sha256()
    for name in PROTO_FILES:
        digest.update(name.encode() + b"\0" + (proto_dir / name).read_bytes())
    return digest.hexdigest() + "\n"


def compile_protos(proto_dir: Path, out_dir: Path) -> list[Path]:
    """Write ``out_dir``/descriptors.binpb (a FileDescriptorSet with its imports) and the
    sources' stamp; returns the written paths. The set holds no protobuf version, so one build
    runs under every protobuf runtime the package admits."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / DESCRIPTOR_SET
        args = [
            "protoc",
            f"-I{IMPORT_PATH}={proto_dir}",
            f"-I{include}",
            f"--descriptor_set_out={built}",
            "--include_imports",
            "--include_source_info",
            *(f"{IMPORT_PATH}/{name}" for name in PROTO_FILES),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILES} in {proto_dir}")
        written = [out_dir / DESCRIPTOR_SET, out_dir / STAMP]
        written[0].write_bytes(built.read_bytes())
    written[1].write_text(source_stamp(proto_dir))
    (out_dir / "__init__.py").write_text('"""Written by the build (protos/compile.py)."""\n')
    return [*written, out_dir / "__init__.py"]
