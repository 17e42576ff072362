"""``${name}`` substitution in string values.

Variables are the ``vars:`` mapping, the sweep variables (a point's values), plus the
top-level scalars ``name``, ``seed`` and ``batch_size``, and ``timestamp``: the UTC time
the spec was loaded (``20250101-120000``), for output names that never collide with an
earlier run's. Names in ``deferred`` (the sweep variables, when the spec is read as a
whole rather than point by point) are left as written. A string that is exactly ``${x}``
takes x's typed value; elsewhere the
value is written into the text. ``$${`` stands for a literal ``${``. Problems (undefined
or malformed references, cycles) are returned as issues and the string is left as is.
"""

from __future__ import annotations

import difflib
import re
from datetime import datetime, timezone
from typing import Any

from ._constants import DEFAULT_BATCH_SIZE, DEFAULT_SEED, SCALAR_VARIABLES
from ._issues import SpecIssue
from ._paths import join_path

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_WHOLE = re.compile(r"\$\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\Z")
_TOKEN = re.compile(r"\$\$\{|\$\{([^{}]*)\}|\$\{")
# Like the YAML alias limit: a few lines of variables that each repeat the previous one
# twice would otherwise expand to gigabytes. No real value comes near either limit.
MAX_EXPANDED_CHARS = 1_000_000
MAX_VARIABLE_DEPTH = 50


def _as_text(value: Any) -> str:
    # Written the way YAML would, so that `${flag}` in text reads `true`, not `True`.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _Unresolvable(Exception):
    """A reference that cannot be expanded; its text is the message for the spec path."""


class _Cycle(_Unresolvable):
    def __init__(self, chain: str):
        super().__init__(f"variables refer to each other in a cycle: {chain}")


class _TooBig(_Unresolvable):
    pass


class _TooDeep(_Unresolvable):
    pass


class Substituter:
    """Resolves variables (lazily, detecting cycles) and substitutes them into the spec."""

    def __init__(
        self,
        data: dict[str, Any],
        default_name: str,
        extra: dict[str, Any] | None = None,
        deferred: frozenset[str] = frozenset(),
    ):
        self.issues: list[SpecIssue] = []
        self.raw: dict[str, Any] = {}
        self.where: dict[str, str] = {}
        self.deferred = deferred
        declared = data.get("vars")
        if isinstance(declared, dict):
            for key, value in declared.items():
                if isinstance(key, str) and _NAME.match(key):
                    if key in SCALAR_VARIABLES:
                        self.issues.append(
                            SpecIssue(
                                join_path("vars", key),
                                f"variable {key!r} clashes with the top-level key {key}; rename it",
                            )
                        )
                        continue
                    self.raw[key] = value
                    self.where[key] = join_path("vars", key)
        for key in SCALAR_VARIABLES:
            if key in data and isinstance(data[key], str | int | float | bool):
                self.raw[key] = data[key]
                self.where[key] = key
        # Defaults count as variables too, so that runs/${name}.h5 works without a name.
        for key, value in (
            ("name", default_name),
            ("seed", DEFAULT_SEED),
            ("batch_size", DEFAULT_BATCH_SIZE),
        ):
            if key not in data:
                self.raw[key] = value
                self.where[key] = key
        if "timestamp" not in self.raw:
            self.raw["timestamp"] = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            self.where["timestamp"] = "timestamp"
        self.resolved: dict[str, Any] = {}
        # A sweep point's values are final: they are never substituted themselves.
        for key, value in (extra or {}).items():
            self.raw[key] = value
            self.where[key] = join_path("sweep", key)
            self.resolved[key] = value
        self._active: list[str] = []
        self._deep_reported = False

    def _report(self, path: str, problem: _Unresolvable) -> None:
        # Every long chain hits the depth limit somewhere; saying so once is enough.
        if isinstance(problem, _TooDeep):
            if self._deep_reported:
                return
            self._deep_reported = True
        self.issues.append(SpecIssue(path, str(problem)))

    def _lookup(self, name: str) -> Any:
        if name in self.resolved:
            return self.resolved[name]
        if name in self._active:
            raise _Cycle(" -> ".join([*self._active[self._active.index(name) :], name]))
        if len(self._active) >= MAX_VARIABLE_DEPTH:
            raise _TooDeep(
                f"variables refer to each other more than {MAX_VARIABLE_DEPTH} levels deep "
                f"({' -> '.join(self._active[:3])} -> ...)"
            )
        self._active.append(name)
        try:
            value = self.raw[name]
            if isinstance(value, str):
                value = self.substitute(value, self.where[name])
        finally:
            self._active.pop()
        self.resolved[name] = value
        return value

    def _undefined(self, name: str, path: str) -> None:
        defined = sorted({*self.raw, *self.deferred} - {"timestamp"})
        message = f"undefined variable {name!r} (defined: {', '.join(defined) or 'none'})"
        close = difflib.get_close_matches(name, defined, n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
        elif not defined or name not in SCALAR_VARIABLES:
            message += "; declare it under vars: (one value) or sweep: (several)"
        self.issues.append(SpecIssue(path, message))

    def substitute(self, text: str, path: str) -> Any:
        """Substitute one string; returns the new value (typed for an exact ``${x}``)."""
        if "${" not in text:
            return text
        whole = _WHOLE.match(text)
        if whole:
            name = whole.group(1)
            if name in self.deferred:
                return text
            if name not in self.raw:
                self._undefined(name, path)
                return text
            try:
                return self._lookup(name)
            except _Unresolvable as problem:
                self._report(path, problem)
                return text
        out: list[str] = []
        size = 0  # characters in out so far
        pos = 0
        failed = False
        for m in _TOKEN.finditer(text):
            out.append(text[pos : m.start()])
            size += m.start() - pos
            pos = m.end()
            token = m.group(0)
            if token == "$${":
                out.append("${")
                continue
            if token == "${":
                self.issues.append(
                    SpecIssue(path, f"unclosed '${{' in {text!r}; write $${{ for a literal '${{'")
                )
                failed = True
                break
            name = m.group(1).strip()
            if name in self.deferred:
                out.append(token)
                continue
            if not _NAME.match(name):
                self.issues.append(
                    SpecIssue(
                        path,
                        f"'{token}' is not a variable reference; names are letters, digits and _",
                    )
                )
                failed = True
                break
            if name not in self.raw:
                self._undefined(name, path)
                failed = True
                break
            try:
                out.append(_as_text(self._lookup(name)))
                size += len(out[-1])
                if size > MAX_EXPANDED_CHARS:
                    raise _TooBig(
                        f"substituting variables here makes a text of over "
                        f"{MAX_EXPANDED_CHARS:,} characters; does a variable repeat another?"
                    )
            except _Unresolvable as problem:
                self._report(path, problem)
                failed = True
                break
        if failed:
            return text
        out.append(text[pos:])
        return "".join(out)

    def _walk(self, value: Any, path: str) -> Any:
        if isinstance(value, str):
            return self.substitute(value, path)
        if isinstance(value, dict):
            return {k: self._walk(v, join_path(path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self._walk(v, join_path(path, i)) for i, v in enumerate(value)]
        return value

    def apply(self, data: dict[str, Any]) -> dict[str, Any]:
        """Substitute throughout the spec; variables end up with their resolved values."""
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key == "vars" and isinstance(value, dict):
                resolved = {}
                for name, raw in value.items():
                    if name in self.raw and self.where.get(name) == join_path("vars", name):
                        try:
                            resolved[name] = self._lookup(name)
                        except _Unresolvable as problem:
                            self._report(join_path("vars", name), problem)
                            resolved[name] = raw
                    else:
                        resolved[name] = self._walk(raw, join_path("vars", name))
                out[key] = resolved
            elif key in SCALAR_VARIABLES and key in self.raw and self.where.get(key) == key:
                try:
                    out[key] = self._lookup(key)
                except _Unresolvable as problem:
                    self._report(key, problem)
                    out[key] = value
            else:
                out[key] = self._walk(value, join_path("", key))
        return out


def substitute(
    data: dict[str, Any],
    default_name: str,
    *,
    extra: dict[str, Any] | None = None,
    deferred: frozenset[str] = frozenset(),
) -> tuple[dict[str, Any], list[SpecIssue]]:
    """Substitute ``${...}`` in every string value of ``data``; returns (new data, issues).

    ``extra`` adds variables with fixed values (a sweep point's); references to names in
    ``deferred`` stay as written.
    """
    sub = Substituter(data, default_name, extra, deferred)
    out = sub.apply(data)
    # One issue per place, even when a variable used in many places is itself broken.
    seen: set[tuple[str, str]] = set()
    issues = []
    for issue in sub.issues:
        if (issue.path, issue.message) not in seen:
            seen.add((issue.path, issue.message))
            issues.append(issue)
    return out, issues


def referenced_names(value: Any) -> set[str]:
    """Every variable name referenced as ``${name}`` in the strings of ``value``."""
    found: set[str] = set()
    if isinstance(value, str):
        for m in _TOKEN.finditer(value):
            if m.group(1) is not None and _NAME.match(m.group(1).strip()):
                found.add(m.group(1).strip())
    elif isinstance(value, dict):
        for item in value.values():
            found |= referenced_names(item)
    elif isinstance(value, list):
        for item in value:
            found |= referenced_names(item)
    return found
