"""Where a loaded model lives: ``auto`` picks the CUDA device with the most free memory that
fits the model (else the CPU); ``cpu`` or ``cuda:N`` pins every model there."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paramserve.registry.errors import InvalidArgument

# Room left beside a model's parameters for activations and the CUDA allocator.
GPU_HEADROOM_FACTOR = 1.2
GPU_HEADROOM_BYTES = 256 << 20


@dataclass(frozen=True)
class Placement:
    spec: str = "auto"

    def __post_init__(self):
        spec = self.spec
        if spec in ("auto", "cpu"):
            return
        if not spec.startswith("cuda"):
            raise InvalidArgument(f"--device {spec!r}: use auto, cpu or cuda:N")
        if not torch.cuda.is_available():
            raise InvalidArgument(
                f"--device {spec}: no CUDA device is available here; use --device auto or cpu"
            )
        index = torch.device(spec).index or 0
        if index >= torch.cuda.device_count():
            raise InvalidArgument(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here"
            )

    def choose(self, size_bytes: int) -> torch.device:
        """The device for a model whose parameters take ``size_bytes``."""
        if self.spec != "auto":
            return torch.device(self.spec)
        if not torch.cuda.is_available():
            return torch.device("cpu")
        needed = size_bytes * GPU_HEADROOM_FACTOR + GPU_HEADROOM_BYTES
        free = [(torch.cuda.mem_get_info(i)[0], i) for i in range(torch.cuda.device_count())]
        best_free, best = max(free)
        return torch.device(f"cuda:{best}") if best_free >= needed else torch.device("cpu")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, shared ones counted once."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
