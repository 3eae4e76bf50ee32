"""Client methods of the learning RPCs (gradients, updates, diff, history).

A mixin ``Client`` inherits: it uses ``self._call``, ``self.registry`` and ``self.timeout_s``.
Like the client, nothing heavy at import: numpy and torch only inside the calls that need them.
"""

from __future__ import annotations


class LearningClient:
    """Gradients, pushed updates, diffs and history; ``Client`` inherits it."""
