"""Exceptions raised by llmkit."""

from __future__ import annotations


class LLMKitError(RuntimeError):
    """Base class of llmkit's own errors."""


class BackendError(LLMKitError):
    """No backend could take a call, or a backend asked for by name cannot take it.

    ``reasons`` maps each backend that was tried to the list of reasons it gave.
    """

    def __init__(self, message: str, reasons: dict[str, list[str]] | None = None):
        super().__init__(message)
        self.reasons = dict(reasons or {})


class UnknownBackendError(LLMKitError, ValueError):
    """A backend name that llmkit does not know."""


class UsageError(LLMKitError, ValueError):
    """A command-line argument llmkit cannot use: the ``llmkit`` command prints the message
    on one line and exits with status 2 (as argparse does for malformed arguments)."""
