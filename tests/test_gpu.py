"""GPU placement: runs where CUDA is present (skipped on CPU-only machines such as CI)."""

from __future__ import annotations

import pytest
import torch

from paramserve.service.client import Client
from paramserve.service.placement import Placement

from conftest import ServerProcess, example_input, reference_module

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_placement_without_gpu_is_cpu():
    if torch.cuda.is_available():
        assert Placement("auto").choose(1 << 40).type == "cpu"  # 1 TiB fits no GPU
    else:
        assert Placement("auto").choose(0).type == "cpu"
        with pytest.raises(Exception, match="no CUDA device"):
            Placement("cuda:0")


@needs_gpu
@pytest.mark.parametrize("device", ["auto", "cuda:0"])
def test_models_run_on_the_gpu_with_cpu_outputs(tmp_path, device):
    assert Placement("auto").choose(1 << 20).type == "cuda"
    srv = ServerProcess(tmp_path / "data", "--device", device)
    try:
        with Client(srv.address) as client:
            for arch in ("sequential_mlp", "tied_mlp", "chimera"):
                module = reference_module(arch, False)
                client.create_model(arch, arch)
                client.upload(arch, module.state_dict())
                x = example_input(arch, False)
                y = client.infer(arch, x)
                assert torch.allclose(y, module(x), atol=1e-4), arch
                meta = client.model_metadata(arch)
                assert meta.parameters["device"].string_param == "cuda:0"
            client.create_model("lazy", "mlp", {"in_features": None})
            assert client.infer("lazy", torch.rand(2, 7)).shape == (2, 10)
    finally:
        srv.stop()


@needs_gpu
def test_gpu_forwards_copy_through_pinned_buffers_and_match_the_cpu():
    from paramserve.service.loaded import _forward_on_gpu

    module = reference_module("sequential_mlp", False)
    x = torch.rand(32, 20)
    expected = module(x).detach()
    on_gpu = module.to("cuda:0")
    with torch.inference_mode():
        y = _forward_on_gpu(on_gpu, x, torch.device("cuda:0"))
    assert y.device.type == "cpu" and y.is_pinned()
    assert torch.allclose(y, expected, atol=1e-4)


@needs_gpu
def test_batched_concurrent_requests_on_the_gpu_match_the_cpu(tmp_path):
    import concurrent.futures

    srv = ServerProcess(tmp_path / "data", "--device", "cuda:0")
    try:
        with Client(srv.address) as client:
            module = reference_module("sequential_mlp", False)
            client.create_model("mlp", "sequential_mlp")
            client.upload("mlp", module.state_dict())
            xs = [torch.rand(1 + i % 3, 20) for i in range(64)]
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                ys = list(pool.map(lambda x: client.infer("mlp", x), xs))
            for x, y in zip(xs, ys):
                assert torch.allclose(y, module(x), atol=1e-4)
    finally:
        srv.stop()
