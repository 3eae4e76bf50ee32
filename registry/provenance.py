"""What made a version: its provenance record, a free-text note and its author, bounded.

A provenance record is a small JSON object whose ``kind`` is the version's origin::

    {"kind": "upload", "file": "w.safetensors", "file_sha256": "..."}
    {"kind": "init", "scheme": "normal(0, 0.01)", "module": "2", "seed": 0}
    {"kind": "patch", "param": "2.weight", "index": "0, 0", "op": "set", "value": 42.0}
    {"kind": "lazy-init", "input_shape": [1, 20]}
    {"kind": "update", "optimizer": "sgd", "lr": 0.1, "step": 3}   (registry/updates.py)

Versions written before migration 0004 have ``{}``. The note and the provenance come from
clients, so both are bounded here, before any work; the author is the caller's token name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .errors import InvalidArgument, ResourceExhausted
from .limits import brief
from .names import check_text

MAX_NOTE_CHARS = 2000
MAX_AUTHOR_CHARS = 200  # the column's width (schema.VersionRow.author)
MAX_PROVENANCE_BYTES = 16 << 10  # as compact JSON
MAX_SHOWN_VALUE_CHARS = 200  # a patch value longer than this is recorded by its shape only


def check_note(note: str | None) -> str:
    """A version's note: text without NUL, at most ``MAX_NOTE_CHARS`` characters."""
    note = note or ""
    if len(note) > MAX_NOTE_CHARS:
        raise ResourceExhausted(
            f"a version's note is {len(note)} characters, over the limit of {MAX_NOTE_CHARS}; "
            "shorten it"
        )
    return check_text(note, "a version's note")


def check_author(author: str | None) -> str:
    author = author or ""
    if len(author) > MAX_AUTHOR_CHARS:
        raise InvalidArgument(
            f"author {brief(author)} is over {MAX_AUTHOR_CHARS} characters; name the token "
            "with a shorter name"
        )
    return check_text(author, "a version's author")


def check_provenance(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """A JSON object of at most ``MAX_PROVENANCE_BYTES``; ``None`` is ``{}``."""
    if record is None:
        return {}
    if not isinstance(record, Mapping):
        raise InvalidArgument(f"provenance must be a JSON object, not {type(record).__name__}")
    try:
        encoded = json.dumps(dict(record), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InvalidArgument(f"provenance must be JSON (finite numbers): {err}") from None
    if len(encoded) > MAX_PROVENANCE_BYTES:
        raise ResourceExhausted(
            f"a version's provenance is {len(encoded)} bytes as JSON, over the limit of "
            f"{MAX_PROVENANCE_BYTES}; record less"
        )
    return json.loads(encoded)


def patch_value(value: Any) -> Any:
    """A patch's value as recorded: a number as is, an array by its shape (and its values when
    short), so a patch with a large array does not make a large record."""
    if isinstance(value, (bool, int, float)):
        return value
    shape = list(getattr(value, "shape", ()))
    tolist = getattr(value, "tolist", None)
    if tolist is not None:
        listed = tolist()
        text = json.dumps(listed)
        if len(text) <= MAX_SHOWN_VALUE_CHARS:
            return listed
    return {"shape": shape}


def summary(record: Mapping[str, Any]) -> str:
    """One line for ``paramserve log``: the record's fields but its kind, ``k=v`` joined."""
    parts = [f"{k}={v}" for k, v in record.items() if k != "kind" and v not in (None, "")]
    line = " ".join(parts)
    return line if len(line) <= 160 else line[:157] + "..."
