"""Health and reflection, served from paramserve's own descriptor pool, called with the
standard's own clients (grpcio-health-checking, grpcio-reflection) against a real server."""

from __future__ import annotations

import signal
import threading

import grpc
import pytest
from conftest import ServerProcess
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from paramserve.protos import reflection_v1_pb2, reflection_v1_pb2_grpc
from paramserve.service.reflection import MAX_ECHO_CHARS


def test_a_reflection_client_rebuilds_every_service_with_its_methods(server):
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        names = set(database.get_services())
        assert {
            "inference.GRPCInferenceService",
            "paramserve.v1.Registry",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names
        pool = descriptor_pool.DescriptorPool(database)
        infer = pool.FindMethodByName("inference.GRPCInferenceService.ModelInfer")
        assert infer.input_type.full_name == "inference.ModelInferRequest"
        upload = pool.FindServiceByName("paramserve.v1.Registry").methods_by_name["UploadVersion"]
        assert upload.output_type.full_name == "paramserve.v1.Version"


def test_reflection_v1_answers_too_and_names_what_it_cannot_find_briefly(server):
    long_name = "x" * 100_000
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_v1_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            stub.ServerReflectionInfo(
                iter(
                    [
                        reflection_v1_pb2.ServerReflectionRequest(
                            file_containing_symbol="paramserve.v1.Registry"
                        ),
                        reflection_v1_pb2.ServerReflectionRequest(file_by_filename=long_name),
                    ]
                ),
                timeout=30,
            )
        )
    found, missing = replies
    assert found.file_descriptor_response.file_descriptor_proto
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert len(missing.error_response.error_message) < MAX_ECHO_CHARS + 50
    assert len(missing.original_request.file_by_filename) == MAX_ECHO_CHARS


def test_reflection_hands_out_the_contract_with_its_comments(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(
            iter(
                stub.ServerReflectionInfo(
                    iter(
                        [
                            reflection_pb2.ServerReflectionRequest(
                                file_containing_symbol="inference.GRPCInferenceService"
                            )
                        ]
                    ),
                    timeout=30,
                )
            )
        )
    from google.protobuf import descriptor_pb2

    file = descriptor_pb2.FileDescriptorProto.FromString(
        reply.file_descriptor_response.file_descriptor_proto[0]
    )
    assert file.package == "inference"
    comments = " ".join(loc.leading_comments for loc in file.source_code_info.location)
    assert "One forward pass" in comments


def test_health_check_watch_and_graceful_shutdown(tmp_path):
    server = ServerProcess(tmp_path / "data", "--grace-s", "5")
    try:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "inference.GRPCInferenceService", "paramserve.v1.Registry"):
                assert (
                    health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
                    == health_pb2.HealthCheckResponse.SERVING
                )
            with pytest.raises(grpc.RpcError) as err:
                health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            seen = [next(watch).status]
            unknown = health.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
            assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            unknown.cancel()
            rest = threading.Thread(target=lambda: seen.extend(r.status for r in watch))
            rest.start()
            server.proc.send_signal(signal.SIGTERM)
            rest.join(timeout=30)
            assert not rest.is_alive()
        assert seen == [
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        ]
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.stop()
