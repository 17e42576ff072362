"""Small helpers that make messages read like a person wrote them."""

from __future__ import annotations

import datetime
import difflib
import json
from collections.abc import Iterable
from typing import Any


def show(value: Any) -> str:
    """A short rendering of a spec value for a message (YAML-like, truncated)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        text = value if len(value) <= 50 else value[:47] + "..."
        return repr(text)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, datetime.date):
        return f"{value} (a date; quote it to make it a string)"
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping {}"
    if isinstance(value, list):
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            return "a list"
        return text if len(text) <= 40 else "a list"
    return f"a {type(value).__name__}"


TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true/false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


def one_of_words(words: Iterable[str], last: str = "or") -> str:
    """``a, b or c``."""
    items = list(words)
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {last} {items[-1]}"


def did_you_mean(word: Any, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""``."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
