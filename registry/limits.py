"""Bounds on what a caller can make the core allocate or compute, checked before the work.

One frozen value, passed to ``Store(limits=...)`` (the server fills it from its flags), so each
parser checks its own size next to the code that reads it::

    limits = Limits(max_init_elements=1 << 20)
    store = Store(data_dir="./data", limits=limits)

Every bound is answered ``ResourceExhausted`` (over a size) or ``InvalidArgument`` (malformed,
e.g. nested too deep) with the limit named, before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    # Parameters a lazy first request, an Initialize or an upload header may make the server
    # materialize, in elements over the whole state_dict (computed on the meta device first).
    max_init_elements: int = 1 << 26
    # Entries in one safetensors header, and its size in bytes.
    max_header_entries: int = 1 << 16
    max_header_bytes: int = 16 << 20
    # A model's config JSON (bytes, nesting depth) and description (characters).
    max_config_bytes: int = 64 << 10
    max_json_depth: int = 32
    max_description_chars: int = 4096


DEFAULT_LIMITS = Limits()
