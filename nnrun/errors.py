"""Errors meant for the user: the CLI prints their message, without a traceback."""

from __future__ import annotations


class NnrunError(Exception):
    """Base class of every error nnrun reports to a user (exit code 1)."""


class ModelError(NnrunError):
    """The model or tokenizer named by the spec could not be loaded."""


class CompileError(NnrunError):
    """The spec is valid but does not fit the model (paths, selections, shapes)."""


class RunError(NnrunError):
    """Raised while executing a plan (for example a shape mismatch at a site)."""
