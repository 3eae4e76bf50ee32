"""Plain, frozen values that leave the core: no ORM rows, no dicts with well-known keys.

>>> spec = TensorSpec(shape=(256, 20), dtype="F32")
>>> spec.describe()
'F32[256, 20]'
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# A served model's one input and one output tensor, by name (KServe v2 and the signature).
INPUT_NAME = "input"
OUTPUT_NAME = "output"


@dataclass(frozen=True)
class TensorSpec:
    """Shape and safetensors dtype name of one state_dict entry; ``shape=None`` while lazy."""

    shape: tuple[int, ...] | None
    dtype: str

    def describe(self) -> str:
        dims = "?" if self.shape is None else ", ".join(str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


@dataclass(frozen=True)
class ManifestEntry:
    """One state_dict key of a stored version; ``tied_to`` names the key whose data it shares;
    ``sha256`` is the digest of its stored bytes (None for versions written before it was kept)."""

    name: str
    spec: TensorSpec
    tied_to: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    config: Mapping[str, Any]
    init: str
    seed: int
    description: str
    created_at: dt.datetime
    lazy: bool
    aliases: Mapping[str, int] = field(default_factory=dict)
    latest_version: int | None = None


@dataclass(frozen=True)
class VersionInfo:
    model: str
    number: int
    sha256: str
    size_bytes: int
    origin: str  # upload | init | lazy-init | patch | update
    parent: int | None
    created_at: dt.datetime
    manifest: tuple[ManifestEntry, ...]
    aliases: tuple[str, ...] = ()
    # What made it (``provenance``): {} for versions written before migration 0004.
    provenance: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""
    author: str = ""  # the token's name when the server checks tokens, else ""
    optimizer_sha256: str | None = None  # the optimizer state after an ``update`` step


@dataclass(frozen=True)
class TensorStats:
    min: float
    max: float
    mean: float
    std: float


@dataclass(frozen=True)
class ParameterInfo:
    """One state_dict entry as a user inspects it (``paramserve params``)."""

    name: str
    spec: TensorSpec
    kind: str  # parameter | buffer
    requires_grad: bool
    tied_with: tuple[str, ...]
    initialized: bool
    stats: TensorStats | None = None
