"""Spec problems as data (SpecIssue) and the exception that carries them (SpecError)."""

from __future__ import annotations

from dataclasses import dataclass

from nnrun.errors import NnrunError


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec.

    ``path`` names the place in the spec (``save.resid.tokens[0]``, ``edits[1].at``;
    ``""`` for the whole document), ``line`` is the 1-based line in the file when known
    and ``source`` the file name when the spec came from a file.
    """

    path: str
    message: str
    line: int | None = None
    source: str | None = None


def format_issue(issue: SpecIssue) -> str:
    """Format an issue as one line: ``specs/x.yaml:12: save.resid.tokens[0]: message``."""
    parts: list[str] = []
    if issue.source is not None:
        parts.append(issue.source if issue.line is None else f"{issue.source}:{issue.line}")
    elif issue.line is not None:
        parts.append(f"line {issue.line}")
    if issue.path:
        parts.append(issue.path)
    parts.append(issue.message)
    return ": ".join(parts)


class SpecError(NnrunError):
    """A spec could not be loaded or is not valid; ``.issues`` lists every problem found."""

    def __init__(self, issues: list[SpecIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(format_issue(i) for i in self.issues))
