"""Bounds on what a caller can make the core allocate or compute, checked before the work.

One frozen value, passed to ``Store(limits=...)`` (the server fills it from its flags), so each
parser checks its own size next to the code that reads it::

    limits = Limits(max_init_elements=1 << 20)
    store = Store(data_dir="./data", limits=limits)
    config = load_config_json('{"hidden": 64}', limits)     # size and depth checked first

Every bound is answered ``ResourceExhausted`` (over a size) or ``InvalidArgument`` (malformed,
e.g. nested too deep) with the limit named, before anything is allocated. Each field is meant
to be a server flag of the same name (``max_init_elements`` → ``--max-init-elements``).
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument, ResourceExhausted


@dataclass(frozen=True)
class Limits:
    # Parameters a lazy first request, an Initialize or an upload header may make the server
    # materialize, in elements over the whole state_dict (computed on the meta device first).
    max_init_elements: int = 1 << 26
    # Dimensions of an input shape that a dry run (lazy init, Initialize) is made with.
    max_input_rank: int = 8
    # Submodules of one built model (counted on the meta device, before a real build).
    max_submodules: int = 10_000
    # Entries in one safetensors header, and its size in bytes.
    max_header_entries: int = 1 << 16
    max_header_bytes: int = 16 << 20
    # A model's config JSON (bytes, nesting depth) and description (characters).
    max_config_bytes: int = 64 << 10
    max_json_depth: int = 32
    max_description_chars: int = 4096
    # The text of an init scheme ("normal(0, 0.01)") and of a tensor index ("0, 1:3").
    max_scheme_chars: int = 256
    max_index_chars: int = 256

    def __post_init__(self):
        for name, value in vars(self).items():
            if type(value) is not int or value < 1:
                raise ValueError(
                    f"Limits.{name} ({flag(name)}) must be a positive integer, not {value!r}"
                )


DEFAULT_LIMITS = Limits()

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 8
_REPR.maxlevel = 3

# JSON integers beyond int64 cannot reach torch or a database column intact.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_MAX_INT_DIGITS = 19
_SCAN_CHUNK_BYTES = 1 << 20


def flag(field: str) -> str:
    """The server flag that sets a ``Limits`` field: ``max_json_depth`` → ``--max-json-depth``."""
    return "--" + field.replace("_", "-")


def brief(value: Any, chars: int = 80) -> str:
    """A repr of client input short enough for a one-line message (never the whole input)."""
    if isinstance(value, (str, bytes)):
        text = repr(value[:chars])
        return text + ("..." if len(value) > chars else "")
    text = _REPR.repr(value)
    return text if len(text) <= chars else text[:chars] + "..."


def over(what: str, amount: int, field: str, limits: Limits) -> str:
    """One line: ``what`` is ``amount``, over the limit, and the flag that raises it."""
    return (
        f"{what} is {amount}, over the limit of {getattr(limits, field)} "
        f"(raise it with {flag(field)})"
    )


def json_outline(raw: bytes) -> tuple[int, int]:
    """``(deepest nesting, top-level items)`` of JSON text without parsing it (the items are
    an upper bound: commas at depth 1, plus one). Brackets inside strings do not count; one
    linear pass, memory of one chunk whatever the size."""
    import numpy as np  # here: a client that only lists models never loads numpy

    deepest = commas = depth = 0
    backslashes = 0  # the run of backslashes just before the chunk
    in_string = 0
    for start in range(0, len(raw), _SCAN_CHUNK_BYTES):
        chunk = np.frombuffer(raw, np.uint8, min(_SCAN_CHUNK_BYTES, len(raw) - start), start)
        index = np.arange(len(chunk))
        is_backslash = chunk == 0x5C
        last_other = np.maximum.accumulate(np.where(is_backslash, -1, index))
        # backslashes right before each byte (a quote after an odd run is escaped)
        run = np.empty(len(chunk), np.int64)
        run[0] = backslashes
        run[1:] = np.where(
            last_other[:-1] >= 0, index[:-1] - last_other[:-1], index[1:] + backslashes
        )
        quote = (chunk == 0x22) & (run % 2 == 0)
        outside = (np.cumsum(quote) + in_string) % 2 == 0
        step = ((chunk == 0x5B) | (chunk == 0x7B)).astype(np.int64)  # [ {
        step -= (chunk == 0x5D) | (chunk == 0x7D)  # ] }
        levels = np.cumsum(step * outside) + depth
        deepest = max(deepest, int(levels.max()))
        commas += int(np.count_nonzero((levels == 1) & (chunk == 0x2C) & outside))
        depth, in_string = int(levels[-1]), int(not outside[-1])
        if is_backslash[-1]:
            backslashes = (
                len(chunk) - 1 - int(last_other[-1])
                if last_other[-1] >= 0
                else len(chunk) + backslashes
            )
        else:
            backslashes = 0
    return deepest, commas + 1


def check_json_depth(raw: bytes, what: str, limits: Limits = DEFAULT_LIMITS) -> int:
    """Refuse JSON text nested deeper than ``limits.max_json_depth`` (before ``json.loads``
    would recurse into it); returns the top-level item bound."""
    depth, items = json_outline(raw)
    if depth > limits.max_json_depth:
        raise InvalidArgument(
            f"{what} is nested {depth} deep, over the limit of "
            f"{limits.max_json_depth} (raise it with {flag('max_json_depth')})"
        )
    return items


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS or not INT64_MIN <= int(text) <= INT64_MAX:
        raise InvalidArgument(
            f"integer {text[:24]}{'...' if len(text) > 24 else ''} is out of "
            "range: JSON integers must fit in 64 bits"
        )
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidArgument(
            f"number {text[:24]}{'...' if len(text) > 24 else ''} is out of "
            "range: JSON numbers must be finite"
        )
    return value


def _refuse_constant(name: str) -> Any:
    raise InvalidArgument(f"{name} is not a JSON number; use a finite number")


def loads_bounded(raw: bytes | str, what: str) -> Any:
    """``json.loads`` that refuses NaN/Infinity, non-finite floats and integers beyond int64;
    every failure is ``InvalidArgument``. Check depth (``check_json_depth``) first."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw  # UTF-8 only, no sniffing
        return json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant
        )
    except InvalidArgument as err:
        raise InvalidArgument(f"{what}: {err}") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise InvalidArgument(f"{what} is not valid JSON: {str(err)[:120]}") from None
    except RecursionError:
        raise InvalidArgument(f"{what} is nested too deep") from None


def load_config_json(text: str | bytes, limits: Limits = DEFAULT_LIMITS) -> dict:
    """A model config from JSON text: size (``max_config_bytes``) and depth
    (``max_json_depth``) are checked before parsing; it must be a JSON object."""
    if isinstance(text, str):
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument("config JSON is not valid UTF-8 text") from None
    else:
        raw = bytes(text)
    if len(raw) > limits.max_config_bytes:
        raise ResourceExhausted(
            over("config JSON size in bytes", len(raw), "max_config_bytes", limits)
        )
    check_json_depth(raw, "config JSON", limits)
    config = loads_bounded(raw, "config JSON")
    if not isinstance(config, dict):
        raise InvalidArgument(
            f'config must be a JSON object like {{"hidden": 64}}, not a {type(config).__name__}'
        )
    return config


def check_config(config: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> None:
    """An already-parsed config: JSON types only, finite numbers, integers within int64, depth
    at most ``max_json_depth`` and serialized size at most ``max_config_bytes``. Walked
    without recursion, and stopped as soon as its size is known to be over."""
    if not isinstance(config, Mapping):
        raise InvalidArgument(
            f'config must be a mapping like {{"hidden": 64}}, not a {type(config).__name__}'
        )
    budget = limits.max_config_bytes
    size = 0
    stack: list[tuple[Any, int]] = [(config, 1)]
    while stack:
        value, depth = stack.pop()
        size += 2
        if isinstance(value, (Mapping, list, tuple)):
            if depth > limits.max_json_depth:
                raise InvalidArgument(
                    f"config is nested more than {limits.max_json_depth} deep"
                    f" (raise it with {flag('max_json_depth')})"
                )
            if isinstance(value, Mapping):
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise InvalidArgument(
                            f"config keys must be strings, not {type(key).__name__}"
                        )
                    size += len(key) + 3
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            size += len(value)
        elif isinstance(value, bool) or value is None:
            size += 4
        elif isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                raise InvalidArgument(
                    f"config integers must fit in 64 bits; one has {value.bit_length()} bits"
                )
            size += 20
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidArgument(f"config numbers must be finite, not {value}")
            size += 24
        else:
            raise InvalidArgument(
                f"config values must be JSON (objects, arrays, strings, "
                f"numbers, booleans, null), not {type(value).__name__}"
            )
        if size > budget:
            raise ResourceExhausted(
                f"config is over {budget} bytes as JSON (raise it with {flag('max_config_bytes')})"
            )
    encoded = len(json.dumps(config, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    if encoded > budget:
        raise ResourceExhausted(
            over("config size in bytes as JSON", encoded, "max_config_bytes", limits)
        )


def check_description(text: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """A model description: at most ``max_description_chars`` characters."""
    if len(text) > limits.max_description_chars:
        raise ResourceExhausted(
            over("description length in characters", len(text), "max_description_chars", limits)
        )
