"""Batching settings, which ``batcher.py`` applies: the server's defaults with per-model
overrides (``--max-batch-size``, ``--max-queue-delay-us``, ``--model-batching``), and the
override RepositoryModelLoad's ``config`` parameter (Triton's model config as JSON) sets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from paramserve.registry.errors import InvalidArgument
from paramserve.registry.limits import DEFAULT_LIMITS, Limits, load_config_json


@dataclass(frozen=True)
class BatchingPolicy:
    """Server-wide batching defaults with per-model overrides (name → (max rows, delay µs))."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024
    per_model: tuple[tuple[str, int, int], ...] = ()

    def for_model(self, name: str) -> tuple[int, int]:
        for model, max_batch, delay_us in self.per_model:
            if model == name:
                return max_batch, delay_us
        return self.max_batch_size, self.max_queue_delay_us


def batching_override(
    parameters: Mapping[str, str], name: str, limits: Limits = DEFAULT_LIMITS
) -> tuple[int, int] | None:
    """RepositoryModelLoad's ``config`` parameter (Triton's model config as JSON): the batching
    fields are applied; anything else is refused rather than silently ignored."""
    unknown = sorted(set(parameters) - {"config"})
    if unknown:
        raise InvalidArgument(
            f"RepositoryModelLoad parameters {unknown[:5]} are not supported; "
            "only 'config' (batching fields) is"
        )
    if "config" not in parameters:
        return None
    config = load_config_json(parameters["config"], limits)
    supported = {"name", "max_batch_size", "dynamic_batching"}
    extra = sorted(set(config) - supported)
    if extra:
        raise InvalidArgument(
            f"model config fields {extra[:5]} cannot be changed here; "
            f"supported: {sorted(supported)}"
        )
    if config.get("name", name) != name:
        raise InvalidArgument(f"config name {str(config['name'])[:80]!r} is not {name!r}")
    dynamic = config.get("dynamic_batching", {})
    if not isinstance(dynamic, dict) or set(dynamic) - {"max_queue_delay_microseconds"}:
        raise InvalidArgument("dynamic_batching supports only max_queue_delay_microseconds")
    max_batch = _bounded_int(config.get("max_batch_size", 64), "max_batch_size", 0, 1 << 16)
    delay_us = _bounded_int(
        dynamic.get("max_queue_delay_microseconds", 0),
        "max_queue_delay_microseconds",
        0,
        10_000_000,
    )
    return max(1, max_batch), delay_us


def _bounded_int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 12:
        value = int(value)  # Triton's JSON writes int64 fields as strings
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidArgument(f"{what} must be an integer in {low}..{high}")
    return value
