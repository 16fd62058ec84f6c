"""The errors qwennb raises on purpose. Each carries one line that a person can act on.

The CLI prints them without a traceback and exits with status 2; the magics turn them into
IPython ``UsageError``.
"""

from __future__ import annotations


class QwennbError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""


class UnknownModelError(QwennbError, KeyError):
    """A model name that is not in the registry and is not a folder with a model in it."""

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return str(self.args[0]) if self.args else ""


class PlanError(QwennbError):
    """The model cannot run on the machine as described (no bf16, not enough memory...)."""


class LoadError(QwennbError):
    """Weights could not be found or loaded."""


class GenerationError(QwennbError, ValueError):
    """Bad generation options, or an output that cannot be trusted (NaN, out of memory)."""
