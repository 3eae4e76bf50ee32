"""The contract: compiled by the build, checked against its sources, in a pool of its own (so
tritonclient loads beside it in either order), and inference.proto speaks Triton's wire format."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from paramserve import protos
from paramserve.protos import inference_pb2
from paramserve.protos.compile import DESCRIPTOR_SET, STAMP, source_stamp


def walk(message) -> dict:
    """Every message under ``message``: name → {field: [number, type, label]}."""
    out = {message.full_name: {f.name: [f.number, f.type, f.label] for f in message.fields}}
    for nested in message.nested_types:
        out.update(walk(nested))
    return out


def test_the_installed_contract_was_built_from_these_sources():
    assert (protos.GENERATED_DIR / STAMP).read_text() == source_stamp(protos.PROTO_DIR)
    names = {f.name for f in protos.descriptor_set().file}
    assert names == {f"paramserve/protos/{name}" for name in protos.PROTO_FILES}
    assert inference_pb2.DESCRIPTOR.pool is protos.pool()


@pytest.fixture
def copied_protos(tmp_path, monkeypatch):
    """The contract's folder copied, and paramserve.protos pointed at it with cold caches."""
    proto_dir = tmp_path / "protos"
    shutil.copytree(protos.PROTO_DIR, proto_dir, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(protos, "PROTO_DIR", proto_dir)
    monkeypatch.setattr(protos, "GENERATED_DIR", proto_dir / "generated")
    protos.descriptor_set.cache_clear()
    yield proto_dir
    protos.descriptor_set.cache_clear()


def test_a_proto_changed_after_the_build_is_refused_with_how_to_rebuild(copied_protos):
    with open(copied_protos / "inference.proto", "a") as f:
        f.write("\n// changed\n")
    with pytest.raises(protos.ContractMissing, match="changed after the package was built"):
        protos.descriptor_set()


def test_an_unbuilt_checkout_says_how_to_build_and_writes_nothing(copied_protos):
    shutil.rmtree(copied_protos / "generated")
    with pytest.raises(protos.ContractMissing, match="pip install -e ."):
        protos.descriptor_set()
    assert not (copied_protos / "generated").exists()


ORDERS = {
    "tritonclient first": "import tritonclient.grpc.service_pb2 as t\n"
    "from paramserve.protos import inference_pb2 as p\n",
    "paramserve first": "from paramserve.protos import inference_pb2 as p\n"
    "import tritonclient.grpc.service_pb2 as t\n",
}


@pytest.mark.parametrize("order", ORDERS)
def test_tritonclient_and_paramserve_import_in_one_process_in_either_order(order):
    code = ORDERS[order] + (
        "from paramserve.service.client import Client\n"
        "import tritonclient.grpc\n"
        "a = p.ModelInferRequest(model_name='m'); b = t.ModelInferRequest(model_name='m')\n"
        "assert t.ModelInferRequest.FromString(a.SerializeToString()) == b\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_inference_proto_matches_tritons_field_numbers_and_types():
    from tritonclient.grpc import model_config_pb2, service_pb2

    triton = {}
    for module in (service_pb2, model_config_pb2):
        for message in module.DESCRIPTOR.message_types_by_name.values():
            triton.update(walk(message))
    mine = {}
    for message in inference_pb2.DESCRIPTOR.message_types_by_name.values():
        mine.update(walk(message))
    ours_only = "inference.ModelMetadataResponse.ParametersEntry"  # the map of our addition
    for message, fields in mine.items():
        if message == ours_only:
            continue
        assert message in triton, f"{message} is not a Triton message"
        theirs = triton[message]
        for name, spec in fields.items():
            if message == "inference.ModelMetadataResponse" and name == "parameters":
                assert spec[0] not in [s[0] for s in theirs.values()]  # our addition is free
                continue
            assert name in theirs and theirs[name] == spec, (
                f"{message}.{name}: {spec} vs {theirs.get(name)}"
            )
    service = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    their_methods = {
        m.name: [m.input_type.full_name, m.output_type.full_name] for m in theirs.methods
    }
    for method in service.methods:
        assert their_methods[method.name] == [
            method.input_type.full_name,
            method.output_type.full_name,
        ]
    assert {
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "ModelInfer",
    } <= {m.name for m in service.methods}


def test_the_descriptor_set_is_the_only_generated_file():
    generated = sorted(p.name for p in protos.GENERATED_DIR.iterdir() if p.name != "__pycache__")
    assert generated == sorted([DESCRIPTOR_SET, STAMP, "__init__.py"])
