"""Errors that are the user's to fix: a job reports them as one line naming the option, file or row, with no
traceback. Anything else (a bare ``ValueError`` or ``KeyError`` included) is a bug and keeps its traceback."""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "ModelError"]


class UserError(ValueError):
    """Bad input: an option, a data row, a model or output file. The message says what to change."""


class ConfigError(UserError):
    """An option has a value nesa_hpc cannot use; the message names the option."""


class ModelError(UserError):
    """A model or adapter folder nesa_hpc cannot use (missing or corrupt tensors, unsupported architecture)."""
