"""paramserve's core: architectures in code, a versioned parameter store, init and patch
operations, parameter queries. Plain Python, no gRPC: usable from a notebook.

>>> from paramserve.registry import Store
>>> store = Store(data_dir="./data")
"""

from .architectures import Architecture, architecture, all_architectures, get as get_architecture
from .errors import (AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument,
                     InvalidStateDict, NotFound, ParamserveError, ResourceExhausted)
from .store import Store
from .values import ManifestEntry, ModelInfo, ParameterInfo, TensorSpec, TensorStats, VersionInfo

__all__ = [
    "Architecture", "architecture", "all_architectures", "get_architecture", "Store",
    "AlreadyExists", "DataLoss", "FailedPrecondition", "InvalidArgument", "InvalidStateDict",
    "NotFound", "ParamserveError", "ResourceExhausted",
    "ManifestEntry", "ModelInfo", "ParameterInfo", "TensorSpec", "TensorStats", "VersionInfo",
]
