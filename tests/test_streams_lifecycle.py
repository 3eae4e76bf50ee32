"""Streams that stall: idle upload streams are reaped (temp files gone, nothing stored),
health and reflection answer whatever holds the RPC slots, uploads beyond their cap are refused
at once, and a download whose client stops reading is closed with its blob file."""

from __future__ import annotations

import asyncio
import os
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from paramserve.protos import registry_pb2 as pb
from paramserve.protos import registry_pb2_grpc
from paramserve.registry import ResourceExhausted, get_architecture
from paramserve.service.client import Client

from conftest import ServerProcess, files_under, metrics_text, wait_for

NOT_SAFETENSORS = b"\x80\x04" + b"x" * 62  # a torch.save-like start: it goes to the spool


def spool(server: ServerProcess) -> list:
    return files_under(server.data_dir / "spool") + files_under(server.data_dir / "blobs" / "tmp")


def request_count(server: ServerProcess, method: str, code: str) -> int:
    text = metrics_text(server.metrics_port)
    found = re.search(rf'paramserve_requests_total\{{code="{code}",method="{method}"\}} (\S+)',
                      text)
    return int(float(found.group(1))) if found else 0


async def open_idle_upload(channel, model: str):
    """An upload stream that sends a header and a few bytes, then nothing."""
    call = registry_pb2_grpc.RegistryStub(channel).UploadVersion(timeout=60)
    try:
        await call.write(pb.UploadChunk(header=pb.UploadHeader(model=model, size_bytes=10_000)))
        await call.write(pb.UploadChunk(data=NOT_SAFETENSORS))
    except grpc.RpcError:
        pass  # refused before the bytes went out: ``outcome`` says how
    return call


async def outcome(call) -> tuple[grpc.StatusCode, str]:
    return await asyncio.wait_for(call.code(), 30), await call.details()


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("limited") / "data",
                        "--stream-idle-timeout-s", "3", "--max-concurrent-rpcs", "4")
    with Client(srv.address) as client:
        client.create_model("m", "small_mlp")
    yield srv
    srv.stop()


def test_idle_uploads_are_reaped_and_probes_answer_meanwhile(limited):
    async def scenario():
        async with grpc.aio.insecure_channel(limited.address) as channel:
            registry = registry_pb2_grpc.RegistryStub(channel)
            calls = [await open_idle_upload(channel, "m") for _ in range(4)]
            # the four hold every slot of --max-concurrent-rpcs 4; their spool files are open
            assert await asyncio.to_thread(wait_for, lambda: len(spool(limited)) == 4, 2)
            try:
                await registry.ListModels(pb.ListModelsRequest(), timeout=10)
                refused = None
            except grpc.aio.AioRpcError as err:
                refused = err.code(), err.details()
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5)
            reflected = [r async for r in reflection_pb2_grpc.ServerReflectionStub(
                channel).ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                    list_services="")]), timeout=5)]
            outcomes = [await outcome(call) for call in calls]
            models = await registry.ListModels(pb.ListModelsRequest(), timeout=10)
            return refused, health, reflected, outcomes, models

    refused, health, reflected, outcomes, models = asyncio.run(scenario())
    assert refused is not None and refused[0] == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    assert "--max-concurrent-rpcs 4" in refused[1]
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    names = {s.name for s in reflected[0].list_services_response.service}
    assert "paramserve.v1.Registry" in names
    assert [code for code, _ in outcomes] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 4, outcomes
    assert all("--stream-idle-timeout-s" in details for _, details in outcomes), outcomes
    assert [m.name for m in models.models] == ["m"]  # answered once the idle ones were reaped
    assert wait_for(lambda: spool(limited) == [])
    with Client(limited.address) as client:
        assert client.list_versions("m") == []


def test_uploads_beyond_the_cap_are_refused_at_once(tmp_path):
    srv = ServerProcess(tmp_path / "data", "--max-concurrent-uploads", "2")
    state = get_architecture("small_mlp").build({}).state_dict()
    try:
        with Client(srv.address) as client:
            client.create_model("m", "small_mlp")

        async def hold_two():
            async with grpc.aio.insecure_channel(srv.address) as channel:
                held = [await open_idle_upload(channel, "m") for _ in range(2)]
                assert await asyncio.to_thread(wait_for, lambda: len(spool(srv)) == 2)
                refused = await asyncio.to_thread(refuse_three)
                for call in held:
                    call.cancel()
                return refused

        def refuse_three() -> list[str]:
            messages = []
            with Client(srv.address) as client:
                for _ in range(3):
                    with pytest.raises(ResourceExhausted) as caught:
                        client.upload("m", state)
                    messages.append(str(caught.value))
            return messages

        refused = asyncio.run(hold_two())
        assert all("--max-concurrent-uploads 2" in message for message in refused), refused
        assert wait_for(lambda: spool(srv) == [])
        with Client(srv.address) as client:  # the slots were given back
            assert client.upload("m", state).number == 1
    finally:
        srv.stop()


def test_a_download_that_the_client_stops_reading_is_closed(tmp_path):
    srv = ServerProcess(tmp_path / "data", "--stream-idle-timeout-s", "1")
    try:
        with Client(srv.address) as client:  # ~25 MB: more than the transport buffers hold
            config = {"hidden": 200_000}
            client.create_model("big", "sequential_mlp", config)
            client.upload("big", get_architecture("sequential_mlp").build(config).state_dict())

        def blob_files_open() -> list[str]:
            fds = f"/proc/{srv.proc.pid}/fd"
            links = []
            for fd in os.listdir(fds):
                try:
                    links.append(os.readlink(f"{fds}/{fd}"))
                except OSError:
                    pass
            return [link for link in links if "/blobs/sha256/" in link]

        async def stall():
            async with grpc.aio.insecure_channel(srv.address) as channel:
                call = registry_pb2_grpc.RegistryStub(channel).DownloadVersion(
                    pb.DownloadVersionRequest(model="big", chunk_bytes=1 << 20))
                assert (await call.read()).WhichOneof("kind") == "header"
                assert await asyncio.to_thread(wait_for, lambda: blob_files_open() != [], 5)
                closed = await asyncio.to_thread(wait_for, lambda: blob_files_open() == [], 20)
                counted = await asyncio.to_thread(wait_for, lambda: request_count(
                    srv, "DownloadVersion", "DEADLINE_EXCEEDED") == 1, 10)
                call.cancel()
                return closed, counted

        closed, counted = asyncio.run(stall())
        assert closed, "the stalled download kept its blob open"
        assert counted
        with Client(srv.address) as client:  # and the server serves on
            assert client.state_dict("big")["0.weight"].shape == (200_000, 20)
    finally:
        srv.stop()
