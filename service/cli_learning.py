"""The learning commands of ``paramserve`` (grad, diff, log, train …): parser and handlers.

``add_learning_commands(command)`` is called by ``cli_parser.build_parser`` with its
``command(name, handler, help_text, examples, ...)`` helper (a subparser with the client's
global flags); the handlers are a few lines over ``Client``, like ``cli_commands``.
Nothing heavy at import.
"""

from __future__ import annotations


def add_learning_commands(command) -> None:
    """Add the learning commands through cli_parser's ``command`` helper."""
