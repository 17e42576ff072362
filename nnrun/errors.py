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


class OutputError(NnrunError):
    """The output file cannot be written: a bad path, an existing output, a busy lock, a full disk."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM.

    A KeyboardInterrupt, so code that catches Ctrl-C catches it too. Once the run
    has cleaned up, `kept` says what was left on disk, in one sentence.
    """

    def __init__(self, signum: int = 2, kept: str = "") -> None:
        super().__init__(signum, kept)
        self.signum = signum
        self.kept = kept

    @property
    def signal_name(self) -> str:
        import signal

        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process killed by it."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"interrupted by {self.signal_name}" + (f"; {self.kept}" if self.kept else "")
