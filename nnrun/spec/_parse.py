"""Parse spec text (YAML or JSON) safely, with the line of every key and list item."""

from __future__ import annotations

import json
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ._issues import SpecError, SpecIssue
from ._paths import join_path
from ._sanitize import HugeInt, is_huge_int_text, parse_int_text

try:  # libyaml parses several times faster; the constructor below stays the same Python code
    from yaml import CSafeDumper as _BaseDumper
    from yaml import CSafeLoader as _BaseLoader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeDumper as _BaseDumper  # type: ignore[assignment]
    from yaml import SafeLoader as _BaseLoader  # type: ignore[assignment]

_MERGE_TAG = "tag:yaml.org,2002:merge"
# Aliases let a few lines expand into a huge tree ("billion laughs"); no real spec comes near.
MAX_NODES = 1_000_000


class SpecLoader(_BaseLoader):  # type: ignore[misc,valid-type]
    """Safe YAML loader: no tags beyond the safe ones, mapping keys kept as written
    (``no:`` stays the string ``"no"``), duplicate keys rejected with their line."""

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[str, Any]:
        if not isinstance(node, MappingNode):
            raise yaml.constructor.ConstructorError(
                None, None, f"expected a mapping, found {node.id}", node.start_mark
            )
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be plain strings", key_node.start_mark
                )
            key = key_node.value
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {first_line[key]})",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        # Merge keys (<<: *base) are resolved by PyYAML; explicit keys then override them.
        self.flatten_mapping(node)
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            mapping[str(key_node.value)] = self.construct_object(value_node, deep=deep)
        return mapping


def _construct_int(loader: SpecLoader, node: Node) -> Any:
    # Python refuses to convert integers past 4300 digits (a ValueError deep in PyYAML);
    # keep such a literal as text so that validation can name its path and line.
    text = loader.construct_scalar(node)
    if isinstance(text, str) and is_huge_int_text(text):
        return HugeInt(text)
    return yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)


SpecLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class SpecDumper(_BaseDumper):  # type: ignore[misc,valid-type]
    """Safe YAML dumper that writes anything it does not know as a string instead of failing
    (a dict passed by a caller may hold such values; validation reports them)."""


SpecDumper.add_representer(None, lambda dumper, value: dumper.represent_str(str(value)))


def _represent_list(dumper: Any, value: list) -> Any:
    # Short lists of scalars read best inline ([clean], [-1]); anything nested stays block.
    flat = all(isinstance(v, str | int | float | bool) or v is None for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flat)


SpecDumper.add_representer(list, _represent_list)


def dump_yaml(data: Any) -> str:
    """The resolved spec as YAML text, keys in their original order."""
    return yaml.dump(
        data, Dumper=SpecDumper, sort_keys=False, allow_unicode=True, default_flow_style=False
    )


def _node_count(node: Node, memo: dict[int, int]) -> int:
    # Memoised on node identity, so an alias costs what its target costs without re-walking.
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # provisional, guards against recursive aliases
    if isinstance(node, MappingNode):
        total = 1 + sum(_node_count(k, memo) + _node_count(v, memo) for k, v in node.value)
    elif isinstance(node, SequenceNode):
        total = 1 + sum(_node_count(v, memo) for v in node.value)
    else:
        total = 1
    memo[key] = min(total, MAX_NODES + 1)
    return memo[key]


def _collect_lines(node: Node, path: str, lines: dict[str, int], seen: set[int]) -> None:
    # A node reached again through an alias is not walked twice; its paths then fall back
    # to the line of the alias itself (the nearest ancestor with a line).
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, ScalarNode):
                continue
            child = join_path(path, key_node.value)
            lines.setdefault(child, key_node.start_mark.line + 1)
            _collect_lines(value_node, child, lines, seen)
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            child = join_path(path, i)
            lines.setdefault(child, item.start_mark.line + 1)
            _collect_lines(item, child, lines, seen)


def _yaml_error(exc: yaml.YAMLError, source: str | None, what: str, text: str = "") -> SpecError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    message = f"{what}: {problem}" + (f" ({context})" if context else "")
    at = getattr(mark, "index", -1)
    if 0 <= at < len(text) and text[at] == "@":
        # YAML reserves '@' at the start of a plain value; standard names start with it.
        message += "; YAML cannot start a value with '@': quote it, e.g. at: \"@layers.5.output\""
    line = mark.line + 1 if mark is not None else None
    return SpecError([SpecIssue("", message, line, source)])


def parse_yaml(text: str, source: str | None) -> tuple[Any, dict[str, int]]:
    """Parse YAML text; returns the data and the line of every key / item path."""
    loader = SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        if _node_count(node, {}) > MAX_NODES:
            raise SpecError(
                [
                    SpecIssue(
                        "",
                        "the spec expands to over a million values (YAML aliases?)",
                        None,
                        source,
                    )
                ]
            )
        lines: dict[str, int] = {}
        _collect_lines(node, "", lines, set())
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source, "invalid YAML", text) from None
    except RecursionError:
        raise SpecError([SpecIssue("", "the spec is nested too deeply", None, source)]) from None
    finally:
        loader.dispose()
    return data, lines


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _yaml_lines_of_json(text: str) -> tuple[dict[str, int], int | None]:
    """Best effort: JSON is (nearly always) YAML, so compose it to learn lines.

    Returns the line map and, if the YAML loader finds a duplicate key, its line."""
    try:
        _, lines = parse_yaml(text, None)
        return lines, None
    except SpecError as err:
        return {}, err.issues[0].line


def parse_json(text: str, source: str | None) -> tuple[Any, dict[str, int]]:
    """Parse JSON text, rejecting duplicate keys; lines come from a YAML compose when possible."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_int=parse_int_text)
    except _DuplicateKey as exc:
        _, line = _yaml_lines_of_json(text)
        raise SpecError([SpecIssue("", f"duplicate key {exc.key!r}", line, source)]) from None
    except json.JSONDecodeError as exc:
        raise SpecError([SpecIssue("", f"invalid JSON: {exc.msg}", exc.lineno, source)]) from None
    except RecursionError:
        raise SpecError([SpecIssue("", "the spec is nested too deeply", None, source)]) from None
    lines, _ = _yaml_lines_of_json(text)
    return data, lines
