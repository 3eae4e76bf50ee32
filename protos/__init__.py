"""The gRPC contract: ``inference.proto`` (KServe v2) and ``registry.proto`` (paramserve.v1).

The build (setup.py runs protos/compile.py) compiles both, with the standard health and
reflection services (their PyPI packages' gencode would pin protobuf), into
``generated/descriptors.binpb``; nothing is generated or written at import. Message classes
and gRPC stubs are made from that descriptor set on first use, in a descriptor pool of
paramserve's own, because:

- tritonclient registers the same KServe messages (``inference.*``) in protobuf's default pool,
  and one pool cannot hold two files defining one symbol: in separate pools both clients
  import in one process;
- a descriptor set holds no protobuf version (``_pb2`` gencode since protobuf 5.26 refuses a
  runtime older than its generator), so one build runs under protobuf 4.25 (what
  tritonclient 2.51 needs) up to 7.x.

The modules keep the generated code's names, so the rest of the code reads as usual:

>>> from paramserve.protos import inference_pb2, registry_pb2_grpc
"""

from __future__ import annotations

import functools
import sys
import types
from pathlib import Path

from .compile import DESCRIPTOR_SET, IMPORT_PATH, PROTO_FILES, STAMP, source_stamp

PROTO_DIR = Path(__file__).resolve().parent
GENERATED_DIR = PROTO_DIR / "generated"
# The contract, and the standard health and reflection services, served from the same pool.
MODULES = tuple(
    f"{proto[: -len('.proto')]}_pb2{grpc}" for proto in PROTO_FILES for grpc in ("", "_grpc")
)


class ContractMissing(ImportError):
    """The package was not built (or was built from other .proto files)."""


@functools.cache
def descriptor_set():
    """The FileDescriptorSet the build wrote, checked against the .proto files beside it."""
    from google.protobuf import descriptor_pb2

    path = GENERATED_DIR / DESCRIPTOR_SET
    if not path.is_file():
        raise ContractMissing(
            f"{path} is missing: paramserve's gRPC code is compiled when the package is built; "
            "install it with pip (`pip install -e .` in a checkout)"
        )
    stamp = GENERATED_DIR / STAMP
    if all((PROTO_DIR / name).is_file() for name in PROTO_FILES) and (
        not stamp.is_file() or stamp.read_text() != source_stamp(PROTO_DIR)
    ):
        raise ContractMissing(
            f"the .proto files in {PROTO_DIR} changed after the package was built; rebuild it "
            "(`pip install -e . --no-deps` in a checkout)"
        )
    return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())


@functools.cache
def pool():
    """paramserve's descriptor pool: the contract and what it imports, nothing else."""
    from google.protobuf import descriptor_pool

    own = descriptor_pool.DescriptorPool()
    for file in descriptor_set().file:  # protoc lists each file after its imports
        own.AddSerializedFile(file.SerializeToString())
    return own


def serialized_files() -> dict[str, bytes]:
    """Each file of the set as a serialized FileDescriptorProto, comments kept (what server
    reflection hands out: grpcurl shows them)."""
    return {f.name: f.SerializeToString() for f in descriptor_set().file}


def _messages_module(module_name: str, proto: str) -> types.ModuleType:
    """What ``<proto>_pb2`` gencode would hold: DESCRIPTOR, the message classes, the
    top-level enums (as wrappers) and their values."""
    from google.protobuf import message_factory
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

    file = pool().FindFileByName(f"{IMPORT_PATH}/{proto}")
    module = types.ModuleType(module_name, f"Messages of {proto}, built from the descriptor set.")
    setattr(module, "DESCRIPTOR", file)  # noqa: B010  (ModuleType declares no DESCRIPTOR)
    classes = message_factory.GetMessageClassesForFiles([file.name], pool())
    for name, message in file.message_types_by_name.items():
        setattr(module, name, classes[message.full_name])
    for name, enum in file.enum_types_by_name.items():
        setattr(module, name, EnumTypeWrapper(enum))
        for value in enum.values:
            setattr(module, value.name, value.number)
    return module


@functools.cache
def _module(name: str) -> types.ModuleType:
    full_name = f"{__name__}.{name}"
    proto = f"{name.split('_pb2')[0]}.proto"
    if name.endswith("_grpc"):
        from .stubs import services_module

        messages = _module(name[: -len("_grpc")])
        file_proto = next(f for f in descriptor_set().file if f.name == f"{IMPORT_PATH}/{proto}")
        module = services_module(full_name, file_proto, messages)
    else:
        module = _messages_module(full_name, proto)
    sys.modules[full_name] = module
    return module


def __getattr__(name: str):
    if name in MODULES:
        return _module(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
