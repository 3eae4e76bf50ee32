"""Index expressions for one tensor, parsed without ``eval``.

>>> parse_index("0, 0")        # weight.data[0, 0]
(0, 0)
>>> parse_index(":")           # weight.data[:]
(slice(None, None, None),)
>>> parse_index("weight[0:2, ::2]")[1]   # the part in brackets, after a name, is accepted too
"""

from __future__ import annotations

import re
from types import EllipsisType
from typing import TYPE_CHECKING

from .errors import InvalidArgument
from .limits import DEFAULT_LIMITS, Limits, brief, flag
from .tensorfile import MAX_RANK

if TYPE_CHECKING:
    import torch  # select takes and returns tensors; split_param and parse_index need no torch

# ASCII digits only ("\\d" takes "٠١" too); at most 19, so every number fits in int64.
_INT = r"-?[0-9]{1,19}"
_PART = re.compile(rf"\s*({_INT})?\s*(?::\s*({_INT})?\s*(?::\s*({_INT})?\s*)?)?\Z")

Index = tuple[int | slice | EllipsisType, ...]


def split_param(text: str) -> tuple[str, str | None]:
    """``"0.weight[0, 0]"`` → ``("0.weight", "0, 0")``; no brackets → ``(text, None)``."""
    text = text.strip()
    if text.endswith("]") and "[" in text:
        name, _, rest = text.partition("[")
        return name.strip(), rest[:-1]
    return text, None


def parse_index(text: str | None, limits: Limits = DEFAULT_LIMITS) -> Index:
    """A comma-separated list of integers, ``a:b:c`` slices and at most one ``...``.

    Bounded before it is parsed (``limits.max_index_chars``); every number fits in int64.
    """
    if text is None or not text.strip():
        return ()
    if len(text) > limits.max_index_chars:
        raise InvalidArgument(
            f"index {brief(text, 40)} is {len(text)} characters, over the "
            f"limit of {limits.max_index_chars} ({flag('max_index_chars')})"
        )
    raw_parts = text.split(",")
    if len(raw_parts) > MAX_RANK:
        raise InvalidArgument(
            f"index {brief(text, 40)} has {len(raw_parts)} parts; a tensor "
            f"has at most {MAX_RANK} dimensions"
        )
    parts: list[int | slice | EllipsisType] = []
    for raw in raw_parts:
        part = raw.strip()
        if part == "...":
            if Ellipsis in parts:
                raise InvalidArgument(f"index {brief(text)} has more than one '...'")
            parts.append(Ellipsis)
            continue
        match = _PART.match(part)
        if not part or not match:
            raise InvalidArgument(
                f"cannot parse index {brief(text)}: {brief(part, 30)} is not "
                "an integer (at most 19 digits), a slice like 0:2 or ::2, "
                "or '...'"
            )
        start, stop, step = match.groups()
        if ":" not in part:
            parts.append(int(start))
            continue
        if step is not None and int(step) <= 0:
            raise InvalidArgument(f"index {brief(text)}: slice steps must be positive")
        parts.append(slice(*(None if v is None else int(v) for v in (start, stop, step))))
    return tuple(parts)


def select(tensor: torch.Tensor, index: Index, name: str) -> torch.Tensor:
    """``tensor[index]`` as a view, with a message naming the tensor when it does not fit."""
    try:
        return tensor[index] if index else tensor
    except (IndexError, TypeError, RuntimeError, ValueError, OverflowError) as err:
        raise InvalidArgument(
            f"index [{brief(format_index(index), 120)}] does not fit "
            f"{brief(name)} of shape {list(tensor.shape)}: "
            f"{str(err).splitlines()[0][:160]}"
        ) from err


def format_index(index: Index) -> str:
    def one(part):
        if part is Ellipsis:
            return "..."
        if isinstance(part, slice):
            text = ":".join("" if v is None else str(v) for v in (part.start, part.stop))
            return text + (f":{part.step}" if part.step is not None else "")
        return str(part)

    return ", ".join(one(p) for p in index)
