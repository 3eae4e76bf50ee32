"""paramserve's core: architectures in code, a versioned parameter store, init and patch
operations, parameter queries. Plain Python, no gRPC: usable from a notebook.

>>> from paramserve.registry import Store
>>> store = Store(data_dir="./data")

The names below are imported on first use, so a submodule that needs no torch (errors,
values, tensorfile, blobs: what the lean client reads) can be imported without it.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Architecture": "architectures",
    "architecture": "architectures",
    "all_architectures": "architectures",
    "get_architecture": "architectures",
    "Store": "store",
    **{
        name: "errors"
        for name in (
            "AlreadyExists",
            "DataLoss",
            "FailedPrecondition",
            "InvalidArgument",
            "InvalidStateDict",
            "NotFound",
            "ParamserveError",
            "ResourceExhausted",
        )
    },
    **{
        name: "values"
        for name in (
            "ManifestEntry",
            "ModelInfo",
            "ParameterInfo",
            "TensorSpec",
            "TensorStats",
            "VersionInfo",
        )
    },
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(
        importlib.import_module(f"{__name__}.{module}"),
        "get" if name == "get_architecture" else name,
    )
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
