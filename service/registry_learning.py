"""Servicer-side functions of the learning RPCs (Gradients, ApplyUpdate, Train, Diff …).

Each takes the ``RegistryServicer`` (its store, manager, worker pool) and the request;
``registry_service`` delegates to them in one line each, so the learning RPCs live beside
each other without growing the main servicer.
"""

from __future__ import annotations


async def gradients(servicer, request, context):
    """Registry.Gradients: a header (loss, each gradient's stats), then the gradients' bytes."""
    from paramserve.registry.errors import FailedPrecondition

    raise FailedPrecondition("Gradients is being built")
    yield  # an async generator: a server stream
