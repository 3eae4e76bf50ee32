"""What a torch.save file shows before torch reads it: its zip layout and what its pickle names.

``torch.load(weights_only=True)`` (``statedict``) is the last word on a pickle; these checks
only make its refusals early, without torch and without running the pickle (its opcodes are
read, never executed): the client checks a whole file before sending it, the server checks an
upload's first bytes as they arrive. A state_dict's pickle names torch's rebuild functions,
storages and ``collections.OrderedDict``; ``torch.save(model)`` names the model's classes
(``torch.nn.modules.*``, ``__main__``), which weights_only loading refuses.

>>> check_file(path, "w.pt")             # InvalidArgument naming the problem, or None
>>> decided = check_stream_start(prefix)  # False: more bytes needed to tell
"""

from __future__ import annotations

import pickletools
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidArgument
from .limits import brief

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80"  # the pre-1.6 format: a bare pickle, nothing to check before torch
MAX_PICKLE_SCAN_BYTES = 16 << 20  # a state_dict's data.pkl is small; a larger one is not scanned
# Top-level packages a state_dict's pickle may name (weights_only allows a subset of these).
ALLOWED_PACKAGES = frozenset(
    {"torch", "collections", "builtins", "__builtin__", "_codecs", "copyreg", "numpy", "math"}
)
FIX = "save and upload model.state_dict() (torch.save or safetensors)"
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip entry's local file header
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


def is_torch_save(start: bytes | bytearray) -> bool:
    return start[:4] == ZIP_MAGIC or start[:1] == LEGACY_MAGIC


def unknown_format(start: bytes | bytearray, label: str = "upload") -> InvalidArgument:
    """The error for bytes that are neither format (``start``: the first ones)."""
    return InvalidArgument(
        f"{label} is neither safetensors nor a torch.save'd state_dict (it "
        f"starts with {bytes(start[:8])!r}); save with "
        "safetensors.torch.save_file or torch.save(model.state_dict())"
    )


def pickle_globals(data: bytes) -> Iterator[str]:
    """Each ``module.name`` the pickle imports, in order; ``ValueError`` where it is cut short
    or malformed. A STACK_GLOBAL (protocol 4) whose strings cannot be followed is skipped."""
    tops: list[str | None] = []  # the last values pushed: a string, or None for anything else
    memo: dict[int, str | None] = {}
    for op, arg, _ in pickletools.genops(data):
        if op.name == "MEMOIZE":
            memo[len(memo)] = tops[-1] if tops else None
            continue
        if op.name in _PUTS and isinstance(arg, int):
            memo[arg] = tops[-1] if tops else None
            continue
        if op.name in _GETS and isinstance(arg, int):
            tops.append(memo.get(arg))
        elif op.name == "GLOBAL":
            yield str(arg).replace(" ", ".", 1)
            tops.append(None)
        elif op.name == "STACK_GLOBAL":
            if len(tops) >= 2 and isinstance(tops[-2], str) and isinstance(tops[-1], str):
                yield f"{tops[-2]}.{tops[-1]}"
            tops.append(None)
        else:
            tops.append(arg if isinstance(arg, str) and "UNICODE" in op.name else None)
        del tops[:-2]


def check_globals(data: bytes, label: str) -> None:
    """Refuse a pickle naming what torch.load(weights_only=True) refuses; reads as far as
    ``data`` goes (``ValueError`` where it ends or is malformed)."""
    for name in pickle_globals(data):
        if name.split(".", 1)[0] not in ALLOWED_PACKAGES or name.startswith("torch.nn.modules."):
            raise InvalidArgument(
                f"{label} pickles {brief(name)}, which the server refuses to load (it reads "
                "tensors only, with torch.load(weights_only=True)); a whole model saved with "
                f"torch.save(model)? {FIX}"
            )


def check_file(path: Path, label: str) -> None:
    """A whole torch.save file (zip format): it opens as a zip (the central directory is at
    the end, so a truncated file fails here), holds one ``<archive>/data.pkl``, and that
    pickle names only what a state_dict's does."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [
                i
                for i in archive.infolist()
                if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")
            ]
            if len(pickles) != 1:
                raise InvalidArgument(
                    f"{label} is a zip archive with {len(pickles)} <archive>/data.pkl entries, "
                    f"not a torch.save file (which holds one); {FIX}"
                )
            if pickles[0].file_size <= MAX_PICKLE_SCAN_BYTES:
                with archive.open(pickles[0]) as pickle:
                    data = pickle.read()
                try:
                    check_globals(data, label)
                except ValueError as err:
                    raise InvalidArgument(
                        f"{label}: its data.pkl is not a valid pickle ({err}); save it again"
                    ) from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        raise InvalidArgument(
            f"{label} is not a readable torch.save file: the zip archive is "
            f"damaged or truncated ({err}); save it again"
        ) from None


def check_stream_start(prefix: bytes | bytearray, label: str = "upload") -> bool:
    """The first bytes of an upload that starts with a zip entry: torch.save writes
    ``<archive>/data.pkl`` first and uncompressed, so its pickle can be checked before the
    tensors' bytes arrive. True once decided (checked, or not checkable this early: another
    first entry, compressed, malformed); False while more bytes are needed."""
    if len(prefix) < _LOCAL_HEADER.size:
        return False
    fields = _LOCAL_HEADER.unpack_from(prefix)
    method, name_length, extra_length = fields[3], fields[9], fields[10]
    start = _LOCAL_HEADER.size + name_length + extra_length
    if len(prefix) < start:
        return False
    name = bytes(prefix[_LOCAL_HEADER.size : _LOCAL_HEADER.size + name_length])
    if method != 0 or name.count(b"/") != 1 or not name.endswith(b"/data.pkl"):
        return True
    try:
        check_globals(bytes(prefix[start:]), label)
    except ValueError:
        return False  # cut short (or malformed: then the caller stops waiting at its limit)
    return True
