"""The one canonical form of a version ref, so caches and lookups agree on what a ref means.

>>> parse_ref("latest"), parse_ref(""), parse_ref("01"), parse_ref(3), parse_ref("production")
(None, None, 1, 3, 'production')

Only ASCII decimal digits make a number: ``"²"`` and ``"٠١"`` (``str.isdigit()`` is True for
both) are alias names, and invalid ones, so ``InvalidArgument``. A number is bounded in length
(Python refuses ``int()`` of more than 4,300 digits) and in value (version numbers are 32-bit
columns); one past the bound names no version.
"""

from __future__ import annotations

from .errors import InvalidArgument
from .names import LATEST, check_alias

MAX_REF_DIGITS = 18  # any longer decimal ref is refused before int() is tried
MAX_VERSION_NUMBER = 2**31 - 1  # the versions.number column is a 32-bit integer
_ASCII_DIGITS = frozenset("0123456789")


def parse_ref(ref: int | str | None) -> int | str | None:
    """``None`` for the latest version, an ``int`` for a version number, else an alias name."""
    if ref is None or ref == "" or ref == LATEST:
        return None
    if isinstance(ref, bool):
        raise InvalidArgument(f"version ref {ref!r} is neither a number nor an alias")
    if isinstance(ref, int):
        return ref
    if not isinstance(ref, str):
        raise InvalidArgument(
            f"version ref of type {type(ref).__name__} is neither a number nor an alias"
        )
    if set(ref) <= _ASCII_DIGITS:
        if len(ref) > MAX_REF_DIGITS:
            raise InvalidArgument(
                f"version number {ref[:20]}... has {len(ref)} digits, over "
                f"the {MAX_REF_DIGITS} a version number can have"
            )
        return int(ref)
    return check_alias(ref)


def is_version_number(number: int) -> bool:
    """True when ``number`` can name a stored version (1 .. 2**31-1)."""
    return 1 <= number <= MAX_VERSION_NUMBER
