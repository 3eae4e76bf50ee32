"""Triton's system shared memory extension against a real server, through tritonclient.grpc and
tritonclient.utils.shared_memory (its own libcshm.so makes the POSIX objects), outputs compared
with the same module run in-process; then the regions object alone for what a client cannot
easily arrange (a mix of raw and shared-memory inputs, a server without the extension)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import types
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient  # noqa: E402
from conftest import ServerProcess, reference_module
from tritonclient.utils import InferenceServerException  # noqa: E402

from paramserve.protos import inference_pb2 as pb
from paramserve.registry.errors import FailedPrecondition, InvalidArgument
from paramserve.service.inference_core import InferenceCore
from paramserve.service.shared_memory import SharedMemoryRegions


def _import_cshm():
    """tritonclient.utils.shared_memory, which finds its bundled libcshm.so with
    ``pkg_resources.resource_filename``; setuptools >= 81 no longer ships pkg_resources, so
    where it is missing a stand-in gives that one function (the library and all else are
    tritonclient's own), and is removed again once the module has loaded."""
    try:
        import pkg_resources  # noqa: F401

        shim = None
    except ModuleNotFoundError:

        def resource_filename(package: str, name: str) -> str:
            spec = importlib.util.find_spec(package)
            assert spec is not None and spec.origin is not None
            return str(Path(spec.origin).parent / name)

        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = resource_filename  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    try:
        import tritonclient.utils.shared_memory as cshm
    finally:
        if shim is not None and sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]
    return cshm


shm = _import_cshm()
MAX_REGIONS = 6


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("shm") / "data",
        "--max-shm-regions",
        str(MAX_REGIONS),
        "--max-shm-mb",
        "4",
    )
    yield srv
    srv.stop()


@pytest.fixture
def triton(shm_server):
    client = grpcclient.InferenceServerClient(url=shm_server.address)
    yield client
    client.unregister_system_shared_memory()  # every region: tests start from none
    client.close()


@pytest.fixture
def regions():
    """Makes POSIX shared memory objects with tritonclient; destroys what is left after."""
    made = {}

    def create(byte_size: int):
        key = f"/paramserve-test-{uuid.uuid4().hex[:12]}"
        made[key] = shm.create_shared_memory_region(key[1:], key, byte_size)
        return key, made[key]

    yield create
    for key, handle in made.items():
        if os.path.exists(f"/dev/shm{key}"):
            shm.destroy_shared_memory_region(handle)


@pytest.fixture(scope="module")
def mlp(shm_server):
    """A sequential_mlp model (input [-1, 20] FP32 → output [-1, 10]) and its module."""
    from paramserve.service.client import Client

    name = "shm-mlp"
    module = reference_module("sequential_mlp", False, seed=7)
    with Client(shm_server.address, timeout_s=60) as client:
        client.create_model(name, "sequential_mlp")
        client.upload(name, module.state_dict())
    return name, module


def expected_of(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def code_of(excinfo) -> str:
    return excinfo.value.status()


def shm_input(region: str, x: np.ndarray, offset: int = 0):
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_shared_memory(region, x.nbytes, offset)
    return tensor


def shm_output(region: str, byte_size: int, offset: int = 0):
    output = grpcclient.InferRequestedOutput("output")
    output.set_shared_memory(region, byte_size, offset)
    return output


def test_inputs_and_outputs_in_regions_match_the_in_process_forward(triton, regions, mlp):
    model, module = mlp
    x = np.random.default_rng(0).random((3, 20), dtype=np.float32)
    in_key, in_handle = regions(4096)
    out_key, out_handle = regions(4096)
    # the region starts 256 bytes into the object, the tensor 128 bytes into the region
    shm.set_shared_memory_region(in_handle, [x], offset=256 + 128)
    triton.register_system_shared_memory("in", in_key, 2048, offset=256)
    triton.register_system_shared_memory("out", out_key, 1024, offset=512)
    result = triton.infer(
        model, [shm_input("in", x, offset=128)], outputs=[shm_output("out", 3 * 10 * 4, 64)]
    )
    output = result.get_output("output")
    assert output.datatype == "FP32" and list(output.shape) == [3, 10]
    assert output.parameters["shared_memory_region"].string_param == "out"
    assert output.parameters["shared_memory_byte_size"].int64_param == 3 * 10 * 4
    assert list(result.get_response().raw_output_contents) == [b""]  # Triton's placeholder
    y = shm.get_contents_as_numpy(out_handle, np.float32, [3, 10], offset=512 + 64)
    np.testing.assert_allclose(y, expected_of(module, x), atol=1e-6)

    status = triton.get_system_shared_memory_status()
    by_name = {r.name: r for r in status.regions.values()}
    assert set(by_name) == {"in", "out"}
    assert (by_name["in"].key, by_name["in"].offset, by_name["in"].byte_size) == (
        in_key,
        256,
        2048,
    )
    only = triton.get_system_shared_memory_status("out").regions
    assert list(only) == ["out"] and only["out"].byte_size == 1024
    triton.unregister_system_shared_memory("in")
    with pytest.raises(InferenceServerException) as err:
        triton.get_system_shared_memory_status("in")
    assert code_of(err) == "StatusCode.NOT_FOUND"
    triton.unregister_system_shared_memory("in")  # again: no error, as Triton
    triton.unregister_system_shared_memory()
    assert not triton.get_system_shared_memory_status().regions


def test_an_input_in_a_region_with_the_output_inline_and_a_request_without_any(
    triton, regions, mlp
):
    model, module = mlp
    x = np.random.default_rng(1).random((5, 20), dtype=np.float32)
    key, handle = regions(x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    triton.register_system_shared_memory("in", key, x.nbytes)
    result = triton.infer(model, [shm_input("in", x)])
    np.testing.assert_allclose(result.as_numpy("output"), expected_of(module, x), atol=1e-6)
    plain = grpcclient.InferInput("input", [5, 20], "FP32")
    plain.set_data_from_numpy(x)
    result = triton.infer(model, [plain])
    np.testing.assert_allclose(result.as_numpy("output"), expected_of(module, x), atol=1e-6)
    assert not result.get_output("output").parameters


def test_regions_through_model_stream_infer(triton, regions, mlp):
    """The stream serves each message as a ModelInfer: regions work there too, and a message
    naming an unknown region is answered in error, the stream going on."""
    import queue

    model, module = mlp
    x = np.random.default_rng(3).random((4, 20), dtype=np.float32)
    key, handle = regions(x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    out_key, out_handle = regions(4 * 10 * 4)
    triton.register_system_shared_memory("in", key, x.nbytes)
    triton.register_system_shared_memory("out", out_key, 4 * 10 * 4)
    answers: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        triton.async_stream_infer(model, [shm_input("nowhere", x)], request_id="bad")
        triton.async_stream_infer(
            model, [shm_input("in", x)], outputs=[shm_output("out", 160)], request_id="good"
        )
        got = [answers.get(timeout=60) for _ in range(2)]
    finally:
        triton.stop_stream()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1 and "nowhere" in str(errors[0])
    result = next(result for result, error in got if error is None)
    assert result.get_response().id == "good"
    y = shm.get_contents_as_numpy(out_handle, np.float32, [4, 10])
    np.testing.assert_allclose(y, expected_of(module, x), atol=1e-6)


def test_triton_simple_example_with_both_inputs_and_outputs_in_regions(triton, regions, shm_server):
    """Triton's simple_grpc_shm_client against the built-in ``simple``: two INT32 inputs in
    one region, two outputs in another, each at its offset; then INPUT0 in a region beside
    INPUT1 inline (raw_input_contents holds only the inline one, as tritonclient sends)."""
    from paramserve.service.client import Client

    with Client(shm_server.address, timeout_s=60) as client:
        client.create_model("simple", "simple")  # no parameters: version 1 at once
    input0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    input1 = np.ones((1, 16), dtype=np.int32)
    size = input0.nbytes
    in_key, in_handle = regions(2 * size)
    out_key, out_handle = regions(2 * size)
    shm.set_shared_memory_region(in_handle, [input0])
    shm.set_shared_memory_region(in_handle, [input1], offset=size)
    triton.register_system_shared_memory("input_data", in_key, 2 * size)
    triton.register_system_shared_memory("output_data", out_key, 2 * size)
    inputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_shared_memory("input_data", size)
    inputs[1].set_shared_memory("input_data", size, offset=size)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")]
    outputs[0].set_shared_memory("output_data", size)
    outputs[1].set_shared_memory("output_data", size, offset=size)
    result = triton.infer("simple", inputs, outputs=outputs)
    sums = shm.get_contents_as_numpy(out_handle, np.int32, result.get_output("OUTPUT0").shape)
    diffs = shm.get_contents_as_numpy(
        out_handle, np.int32, result.get_output("OUTPUT1").shape, offset=size
    )
    np.testing.assert_array_equal(sums, input0 + input1)
    np.testing.assert_array_equal(diffs, input0 - input1)
    mixed = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    mixed[0].set_shared_memory("input_data", size)
    mixed[1].set_data_from_numpy(3 * input1)
    result = triton.infer("simple", mixed)  # outputs inline
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), input0 + 3)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), input0 - 3)


def test_the_server_lists_the_extension(triton):
    assert "system_shared_memory" in triton.get_server_metadata().extensions


@pytest.mark.parametrize(
    "name, key_of, byte_size, offset, code",
    [
        ("a", lambda key: "/paramserve-test-none", 64, 0, "NOT_FOUND"),
        ("a", lambda key: key, 4097, 0, "INVALID_ARGUMENT"),  # past the end
        ("a", lambda key: key, 4000, 100, "INVALID_ARGUMENT"),  # offset + size past it
        ("a", lambda key: key, 0, 0, "INVALID_ARGUMENT"),
        ("a", lambda key: "/a/b", 64, 0, "INVALID_ARGUMENT"),  # not one shm_open name
        ("a", lambda key: "/" + "k" * 300, 64, 0, "INVALID_ARGUMENT"),
        ("n" * 300, lambda key: key, 64, 0, "INVALID_ARGUMENT"),
        ("a", lambda key: key, 8 << 20, 0, "RESOURCE_EXHAUSTED"),  # over --max-shm-mb 4
    ],
)
def test_register_refuses_what_it_cannot_serve(
    triton, regions, name, key_of, byte_size, offset, code
):
    key, _ = regions(4096)
    with pytest.raises(InferenceServerException) as err:
        triton.register_system_shared_memory(name, key_of(key), byte_size, offset=offset)
    assert code_of(err) == f"StatusCode.{code}", err.value.message()
    assert not triton.get_system_shared_memory_status().regions


def test_duplicate_names_the_region_count_and_the_byte_cap(triton, regions):
    key, _ = regions(4096)
    triton.register_system_shared_memory("r0", key, 4096)
    with pytest.raises(InferenceServerException) as err:
        triton.register_system_shared_memory("r0", key, 64)
    assert code_of(err) == "StatusCode.ALREADY_EXISTS"
    for i in range(1, MAX_REGIONS):
        triton.register_system_shared_memory(f"r{i}", key, 64)  # one object, many regions
    with pytest.raises(InferenceServerException) as err:
        triton.register_system_shared_memory("one-too-many", key, 64)
    assert code_of(err) == "StatusCode.RESOURCE_EXHAUSTED"
    assert "--max-shm-regions" in err.value.message()
    triton.unregister_system_shared_memory()
    big, _ = regions(3 << 20)
    triton.register_system_shared_memory("big", big, 3 << 20)
    with pytest.raises(InferenceServerException) as err:  # 3 MiB + 2 MiB > --max-shm-mb 4
        triton.register_system_shared_memory("bigger", big, 2 << 20)
    assert code_of(err) == "StatusCode.RESOURCE_EXHAUSTED" and "--max-shm-mb" in str(err.value)


def test_inference_errors_name_the_region_and_write_nothing(triton, regions, mlp):
    model, _ = mlp
    x = np.ones((2, 20), np.float32)
    key, handle = regions(4096)
    shm.set_shared_memory_region(handle, [x])
    triton.register_system_shared_memory("in", key, 4096)
    out_key, out_handle = regions(4096)
    sentinel = np.full(1024, 7, np.int32)
    shm.set_shared_memory_region(out_handle, [sentinel])
    triton.register_system_shared_memory("small", out_key, 64)
    cases = [
        ([shm_input("nowhere", x)], None, "NOT_FOUND"),
        ([shm_input("in", x, offset=4000)], None, "INVALID_ARGUMENT"),  # past the region
        (
            [shm_input("in", np.ones((3, 20), np.float32)).set_shared_memory("in", 12)],
            None,
            "INVALID_ARGUMENT",
        ),  # 12 bytes for a [3, 20] FP32
        ([shm_input("in", x)], [shm_output("nowhere", 160)], "NOT_FOUND"),
        ([shm_input("in", x)], [shm_output("small", 64)], "INVALID_ARGUMENT"),  # 160 > 64
        ([shm_input("in", x)], [shm_output("small", 160)], "INVALID_ARGUMENT"),  # past it
    ]
    for inputs, outputs, code in cases:
        with pytest.raises(InferenceServerException) as err:
            triton.infer(model, inputs, outputs=outputs)
        assert code_of(err) == f"StatusCode.{code}", err.value.message()
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(out_handle, np.int32, [1024]), sentinel
    )  # the output too large for "small" wrote none of it


def test_a_truncated_object_is_an_error_and_an_unlinked_one_still_serves(
    triton, regions, mlp, shm_server
):
    model, module = mlp
    x = np.random.default_rng(2).random((2, 20), dtype=np.float32)
    key, handle = regions(4096)
    shm.set_shared_memory_region(handle, [x])
    triton.register_system_shared_memory("in", key, x.nbytes)
    out_key, _ = regions(4096)
    triton.register_system_shared_memory("out", out_key, 4096)
    os.truncate(f"/dev/shm{out_key}", 16)  # the client shrinks its output object
    with pytest.raises(InferenceServerException) as err:
        triton.infer(model, [shm_input("in", x)], outputs=[shm_output("out", 80)])
    assert code_of(err) == "StatusCode.FAILED_PRECONDITION" and "truncated" in str(err.value)
    # destroyed (unlinked) by the client: the server's descriptor keeps the object (POSIX)
    shm.destroy_shared_memory_region(handle)
    result = triton.infer(model, [shm_input("in", x)])
    np.testing.assert_allclose(result.as_numpy("output"), expected_of(module, x), atol=1e-6)
    # truncated to nothing and read as an input region: an error too
    os.truncate(f"/dev/shm{out_key}", 0)
    with pytest.raises(InferenceServerException) as err:
        triton.infer(model, [shm_input("out", np.ones((1, 20), np.float32))])
    assert code_of(err) == "StatusCode.FAILED_PRECONDITION"
    assert triton.is_server_live() and shm_server.proc.poll() is None
    plain = grpcclient.InferInput("input", [2, 20], "FP32")
    plain.set_data_from_numpy(x)
    np.testing.assert_allclose(
        triton.infer(model, [plain]).as_numpy("output"), expected_of(module, x), atol=1e-6
    )


def test_the_readme_snippet_runs_after_the_quick_start(shm_server, tmp_path):
    """The README's shared memory block, run after the Quick start's tritonclient block as it
    says (keys made unique, the pkg_resources stand-in first), matches the in-process MLP."""
    import subprocess

    from paramserve.registry.builtin import MLP
    from paramserve.service.client import Client

    module = MLP().eval()
    with Client(shm_server.address, timeout_s=60) as client:
        client.create_model("mlp", "mlp")
        client.upload("mlp", module.state_dict(), alias="production")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = readme.split("```python\n")[1:]
    quick = next(b for b in blocks if "tritonclient.grpc" in b).split("```")[0]
    snippet = next(b for b in blocks if "shared_memory as shm" in b).split("```")[0]
    tag = uuid.uuid4().hex[:8]
    snippet = snippet.replace("/my_in", f"/my_in_{tag}").replace("/my_out", f"/my_out_{tag}")
    code = "\n".join(
        [
            "import importlib.util, pathlib, sys, types",
            "try:\n    import pkg_resources\nexcept ModuleNotFoundError:",
            "    m = types.ModuleType('pkg_resources')",
            "    m.resource_filename = lambda p, n: str(pathlib.Path("
            "importlib.util.find_spec(p).origin).parent / n)",
            "    sys.modules['pkg_resources'] = m",
            quick.replace("127.0.0.1:8001", shm_server.address),
            snippet,
            "np.save('x.npy', x); np.save('y.npy', y)",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    x, y = np.load(tmp_path / "x.npy"), np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(y, expected_of(module, x.astype(np.float32)), atol=1e-6)
    assert not os.path.exists(f"/dev/shm/my_in_{tag}")  # the snippet cleans up


# ---- the regions object alone -----------------------------------------------------------


@pytest.fixture
def local(regions):
    table = SharedMemoryRegions(max_regions=8, max_bytes=1 << 20, max_tensor_elements=1000)
    yield table
    table.close()


def _request(*inputs) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, shape, region in inputs:
        tensor = request.inputs.add(name=name, datatype="INT32", shape=shape)
        if region:
            tensor.parameters["shared_memory_region"].string_param = region
            tensor.parameters["shared_memory_byte_size"].int64_param = 4 * int(np.prod(shape))
    return request


def test_raw_and_region_inputs_interleave_in_the_order_of_the_inputs(local, regions):
    key, handle = regions(64)
    shm.set_shared_memory_region(handle, [np.arange(4, dtype=np.int32)])
    local.register("r", key, 0, 64)
    request = _request(("A", [2], None), ("B", [4], "r"), ("C", [1], None))
    request.raw_input_contents.extend([b"a" * 8, b"c" * 4])  # only the inputs not in a region
    assert local.read_inputs(request) is request
    assert list(request.raw_input_contents) == [
        b"a" * 8,
        np.arange(4, dtype=np.int32).tobytes(),
        b"c" * 4,
    ]
    plain = _request(("A", [2], None))
    plain.raw_input_contents.append(b"a" * 8)
    assert local.read_inputs(plain) is plain and list(plain.raw_input_contents) == [b"a" * 8]
    typed = _request(("B", [4], "r"))
    typed.inputs[0].parameters["shared_memory_region"].int64_param = 3
    with pytest.raises(InvalidArgument, match="must be a string_param"):
        local.read_inputs(typed)
    with pytest.raises(InvalidArgument, match="raw_input_contents holds 1 buffers"):
        wrong = _request(("A", [2], None), ("B", [4], "r"), ("C", [1], None))
        wrong.raw_input_contents.append(b"a" * 8)
        local.read_inputs(wrong)


def test_close_closes_every_descriptor_and_refuses_more(regions):
    table = SharedMemoryRegions(max_regions=8, max_bytes=1 << 20, max_tensor_elements=1000)
    key, _ = regions(64)
    table.register("a", key, 0, 64)
    table.register("b", key, 0, 32)
    fds = [r.fd for r in table._regions.values()]
    table.close()
    assert len(table) == 0
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    with pytest.raises(FailedPrecondition):
        table.register("c", key, 0, 64)


def test_a_server_without_the_extension_does_not_list_it():
    core = InferenceCore(None, 8, 1000, shared_memory=None)  # type: ignore[arg-type]
    metadata = asyncio.run(core.server_metadata(pb.ServerMetadataRequest()))
    assert "system_shared_memory" not in metadata.extensions
    with pytest.raises(FailedPrecondition, match="--max-shm-regions 0"):
        asyncio.run(
            core.system_shared_memory_register(
                pb.SystemSharedMemoryRegisterRequest(name="a", key="/k", byte_size=8)
            )
        )


def test_an_object_truncated_between_the_check_and_the_read_is_an_error(
    local, regions, monkeypatch
):
    """The window an mmap would turn into SIGBUS: the size check passed, then the object
    shrank. pread returns fewer bytes and the request fails; the process lives."""
    from paramserve.service.shared_memory import Region

    key, _ = regions(4096)
    local.register("r", key, 0, 4096)
    os.truncate(f"/dev/shm{key}", 100)
    monkeypatch.setattr(Region, "check_size", lambda self: None)  # as if it ran just before
    with pytest.raises(FailedPrecondition, match="truncated"):
        local._regions["r"].read(0, 4096)
