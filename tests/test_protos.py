"""The contract: generated code is current, and inference.proto speaks Triton's wire format."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

from paramserve import protos
from paramserve.protos import inference_pb2

def walk(message) -> dict:
    """Every message under ``message``: name → {field: [number, type, label]}."""
    out = {message.full_name: {f.name: [f.number, f.type, f.label] for f in message.fields}}
    for nested in message.nested_types:
        out.update(walk(nested))
    return out


# Runs in a subprocess: tritonclient's messages cannot share a process with ours.
TRITON_DUMP = "import json\n" + inspect.getsource(walk) + r'''
from tritonclient.grpc import service_pb2, model_config_pb2
result = {}
for module in (service_pb2, model_config_pb2):
    for message in module.DESCRIPTOR.message_types_by_name.values():
        result.update(walk(message))
service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
methods = {m.name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods}
print(json.dumps({"messages": result, "methods": methods}))
'''


def ours() -> dict:
    result = {}
    for message in inference_pb2.DESCRIPTOR.message_types_by_name.values():
        result.update(walk(message))
    return result


def test_generated_code_is_current(tmp_path):
    assert protos.is_current(), "run `python -m paramserve.protos`"
    protos.generate(tmp_path)
    for module in protos.MODULES:
        fresh = (tmp_path / f"{module}.py").read_text()
        assert (protos.GENERATED_DIR / f"{module}.py").read_text() == fresh, (
            f"{module}.py differs from what protoc makes of the .proto files: it was edited or "
            "is stale; run `python -m paramserve.protos`")


def test_a_changed_proto_makes_the_generated_code_stale(tmp_path, monkeypatch):
    (tmp_path / "inference.proto").write_text(
        (protos.PROTO_DIR / "inference.proto").read_text() + "\n// changed\n")
    (tmp_path / "registry.proto").write_text((protos.PROTO_DIR / "registry.proto").read_text())
    monkeypatch.setattr(protos, "PROTO_DIR", tmp_path)
    assert not protos.is_current()


def test_inference_proto_matches_tritons_field_numbers_and_types():
    dump = subprocess.run([sys.executable, "-c", TRITON_DUMP], capture_output=True, text=True,
                          check=True).stdout
    triton = json.loads(dump)
    mine = ours()
    ours_only = "inference.ModelMetadataResponse.ParametersEntry"  # the map of our addition
    for message, fields in mine.items():
        if message == ours_only:
            continue
        assert message in triton["messages"], f"{message} is not a Triton message"
        theirs = triton["messages"][message]
        for name, spec in fields.items():
            if message == "inference.ModelMetadataResponse" and name == "parameters":
                assert spec[0] not in [s[0] for s in theirs.values()]  # our addition is free
                continue
            assert name in theirs and theirs[name] == spec, f"{message}.{name}: {spec} vs " \
                                                            f"{theirs.get(name)}"
    service = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        assert triton["methods"][method.name] == [method.input_type.full_name,
                                                  method.output_type.full_name]
    assert {"ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
            "RepositoryModelUnload", "ModelInfer"} <= {m.name for m in service.methods}
