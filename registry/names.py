"""Names a user picks (models, aliases): one rule, checked before any of them reaches SQL.

``\\Z`` rather than ``$`` (which lets a trailing newline through), ASCII only, no NUL (which
PostgreSQL text refuses), at most 128 characters. A lookup validates the name as a create
would, so a malformed name is ``InvalidArgument`` wherever it is given.
"""

from __future__ import annotations

import re
from typing import TypeGuard

from .errors import InvalidArgument

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
LATEST = "latest"
MAX_NAME_CHARS = 128


def is_valid_name(name: object) -> TypeGuard[str]:
    return isinstance(name, str) and NAME_PATTERN.match(name) is not None


def check_name(name: object, what: str = "model name") -> str:
    """``name`` when it is a valid name, else ``InvalidArgument`` (the input truncated)."""
    if not is_valid_name(name):
        shown = name[:80] if isinstance(name, str) else name
        raise InvalidArgument(
            f"{what} {shown!r} is invalid: use 1-{MAX_NAME_CHARS} letters, "
            "digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def check_alias(alias: object) -> str:
    """A valid alias: a name that is neither ``latest`` nor all digits (those name versions)."""
    alias = check_name(alias, "alias")
    if alias == LATEST or alias.isdigit():
        raise InvalidArgument(
            f"alias {alias!r} is reserved: 'latest' and numbers already "
            "name versions; pick a word like 'production'"
        )
    return alias


def check_text(text: str, what: str) -> str:
    """Free text stored as is (a description): no NUL, which PostgreSQL text cannot hold."""
    if not isinstance(text, str) or "\x00" in text:
        raise InvalidArgument(f"{what} must be text without NUL characters")
    return text
