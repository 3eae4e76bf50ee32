"""The core's error tree.

Every error the core raises on purpose is a ``ParamserveError``; the gRPC edge maps each class to
one status code (see ``service``), so a subclass must be picked for what the *caller* should do:

>>> raise NotFound("model 'mlp' not found; create it with `paramserve create mlp ...`")

Messages name the thing and the fix.
"""


class ParamserveError(Exception):
    """Base class of every deliberate error of paramserve."""


class NotFound(ParamserveError):
    """An unknown model, version, alias, architecture, submodule or parameter."""


class AlreadyExists(ParamserveError):
    """A model or alias name that is taken."""


class InvalidArgument(ParamserveError):
    """A bad config, scheme, shape, dtype, index or state_dict."""


class FailedPrecondition(ParamserveError):
    """The request is well-formed but the model cannot do it yet (e.g. no version to serve)."""


class ResourceExhausted(ParamserveError):
    """Over a size limit, or a full queue."""


class DataLoss(ParamserveError):
    """A blob is missing, truncated or its content no longer matches its sha256."""


class Aborted(ParamserveError):
    """A write lost a race it cannot merge (an update computed from a version that is no
    longer the head it named); the message names the version to rebase onto."""


class Unavailable(ParamserveError):
    """A service the store depends on (the object store) cannot be reached; retry later."""


class InvalidStateDict(InvalidArgument):
    """A state_dict that does not fit its architecture; lists every problem at once."""

    def __init__(self, model: str, missing=(), unexpected=(), mismatched=(), other=()):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        self.other = list(other)
        lines = [f"state_dict does not fit model {model!r}:"]
        if self.missing:
            lines.append("  missing keys: " + ", ".join(repr(k) for k in self.missing))
        if self.unexpected:
            lines.append("  unexpected keys: " + ", ".join(repr(k) for k in self.unexpected))
        for name, expected, given in self.mismatched:
            lines.append(f"  {name!r}: expected {expected}, given {given}")
        lines.extend(f"  {line}" for line in self.other)
        lines.append(
            "  fix: save the state_dict of the same architecture and config "
            "(`paramserve params NAME` lists the expected entries)"
        )
        super().__init__("\n".join(lines))
