"""Index expressions for one tensor, parsed without ``eval``.

>>> parse_index("0, 0")        # weight.data[0, 0]
(0, 0)
>>> parse_index(":")           # weight.data[:]
(slice(None, None, None),)
>>> parse_index("weight[0:2, ::2]")[1]   # the part in brackets, after a name, is accepted too
"""

from __future__ import annotations

import re

import torch

from .errors import InvalidArgument

_PART = re.compile(r"^\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?)?$")

Index = tuple[object, ...]


def split_param(text: str) -> tuple[str, str | None]:
    """``"0.weight[0, 0]"`` → ``("0.weight", "0, 0")``; no brackets → ``(text, None)``."""
    text = text.strip()
    if text.endswith("]") and "[" in text:
        name, _, rest = text.partition("[")
        return name.strip(), rest[:-1]
    return text, None


def parse_index(text: str | None) -> Index:
    """A comma-separated list of integers, ``a:b:c`` slices and at most one ``...``."""
    if text is None or not text.strip():
        return ()
    parts: list[object] = []
    for raw in text.split(","):
        part = raw.strip()
        if part == "...":
            if Ellipsis in parts:
                raise InvalidArgument(f"index {text!r} has more than one '...'")
            parts.append(Ellipsis)
            continue
        match = _PART.match(part)
        if not part or not match:
            raise InvalidArgument(f"cannot parse index {text!r}: {part!r} is not an integer, "
                                  "a slice like 0:2 or ::2, or '...'")
        start, stop, step = match.groups()
        if ":" not in part:
            parts.append(int(start))
            continue
        if step is not None and int(step) <= 0:
            raise InvalidArgument(f"index {text!r}: slice steps must be positive")
        parts.append(slice(*(None if v is None else int(v) for v in (start, stop, step))))
    return tuple(parts)


def select(tensor: torch.Tensor, index: Index, name: str) -> torch.Tensor:
    """``tensor[index]`` as a view, with a message naming the tensor when it does not fit."""
    try:
        return tensor[index] if index else tensor
    except (IndexError, TypeError, RuntimeError) as err:
        raise InvalidArgument(f"index [{format_index(index)}] does not fit {name!r} of shape "
                              f"{list(tensor.shape)}: {err}") from err


def format_index(index: Index) -> str:
    def one(part):
        if part is Ellipsis:
            return "..."
        if isinstance(part, slice):
            text = ":".join("" if v is None else str(v) for v in (part.start, part.stop))
            return text + (f":{part.step}" if part.step is not None else "")
        return str(part)
    return ", ".join(one(p) for p in index)
