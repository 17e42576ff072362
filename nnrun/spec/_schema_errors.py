"""Turn jsonschema errors into (path, message) pairs a person can act on.

jsonschema's own messages quote regular expressions and, for unions, say only "is not
valid under any of the given schemas"; here each error kind gets a sentence, unknown
keys get a did-you-mean, and union failures are traced to the branch the user meant.
Rules that read better as semantic checks (one op per edit, alpha needs add, one model
source, device vs device_map) are left to ``_semantic`` and dropped here.
"""

from __future__ import annotations

import difflib
from typing import Any

from ._constants import FUTURE_TOP_LEVEL_KEYS
from ._location import parse_location
from ._messages import TYPE_WORDS, did_you_mean, one_of_words, show
from ._paths import format_path, join_path
from ._select import parse_step_selection, parse_token_selection

_ID_RULE = "must start with a letter or '_' and contain only letters, digits, '_', '.' and '-'"
_PATTERN_WORDS = {
    r"^[A-Za-z0-9_.-]+$": "may contain only letters, digits, '_', '.' and '-'",
    r"^[A-Za-z_][A-Za-z0-9_.-]*$": _ID_RULE,
    r"^[A-Za-z_][A-Za-z0-9_]*$": "must start with a letter or '_' and contain only letters, digits and '_'",
    r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$": "is not a hub id; write org/name",
    r"\.[gG][gG][uU][fF]$": "is not a .gguf file name",
    r"^(auto|cpu|mps|cuda(:[0-9]+)?)$": "is not a device; use auto, cpu, mps, cuda or cuda:N",
    r"^[0-9]+(\.[0-9]+)?\s*[KMG]i?B$": "is not a memory size; write e.g. 20GiB, 500MB or a number of bytes",
    r"^@?[A-Za-z_][A-Za-z0-9_]*(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)|\[-?[0-9]+\])*$": (
        "is neither a named op (softmax, log_softmax, argmax, norm, mean, sum, float) "
        "nor a module path like model.norm or @ln_final"
    ),
}

# What a union ($defs with a title) accepts, for "expected ..., got ..." messages.
_EXPECTED = {
    "Value": "a number, a nested list of numbers, {from: PROMPT_ID} or {file: FILE.h5, dataset: NAME}",
    "Tensor": "a nested list of numbers",
    "ChatPrompt": "{chat: [{role: user, content: TEXT}, ...]}",
    "PromptSelection": "'all' or a list of prompt ids such as [clean]",
    "Prompts": "a mapping id -> text, a list of texts, or {file: prompts.jsonl}",
    "ApplyOp": "a module path (model.norm), a named op (softmax, log_softmax, argmax, norm, mean, sum, float) or {topk: K}",
    "DeviceMap": "one of auto, balanced, balanced_low_0, sequential, or a mapping module -> device",
}

# Unions whose parsers explain any bad value better than a branch-by-branch analysis.
_PARSERS = {"TokenSelection": parse_token_selection, "StepSelection": parse_step_selection}

# Common spellings of enum values that difflib does not find.
_ALIASES = {
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp64": "float64",
    "double": "float64",
}

# Validators whose failures are reported by semantic checks instead.
_SEMANTIC = {"not", "dependentRequired", "dependentSchemas"}


def _title(schema: Any) -> str | None:
    return schema.get("title") if isinstance(schema, dict) else None


def unknown_key_message(key: str, parent: str, allowed: list[str]) -> str:
    """Message for a key the schema does not allow at ``parent``."""
    if parent == "" and key in FUTURE_TOP_LEVEL_KEYS:
        return f"{key!r} is not supported yet by this version of nnrun"
    if parent == "prompts":
        # Only the file form of prompts has fixed keys (the id -> text form takes any id).
        return (
            f"unknown key {key!r} in prompts: with file: the prompts are read from that file, "
            f"and only {', '.join(allowed)} are allowed{did_you_mean(key, allowed)}"
        )
    where = parent or "the top level"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    message = f"unknown key {key!r} in {where}"
    if close:
        message += f"; did you mean {close[0]!r}?"
    if parent == "generate" or not close:
        # generate: takes an allow-list of generation arguments; always say which.
        message += f" (allowed: {', '.join(allowed)})"
    return message


def _required_message(name: str, path: str) -> str:
    if path == "" and name == "nnrun":
        return "this file is not an nnrun spec (missing `nnrun: 1`)"
    hints = {
        "at": " (the location, e.g. at: model.layers.5.output)",
        "prompts": " (id -> text, e.g. prompts: {clean: The capital of France is})",
        "max_new_tokens": " (how many tokens to generate)",
    }
    return f"missing required key {name!r}" + hints.get(name, "")


def _branch_mismatch(errors: list[Any]) -> bool:
    # A branch of the wrong kind altogether (wrong type, or not the constant it wants).
    return any(not e.relative_path and e.validator in ("type", "const", "enum") for e in errors)


def _branch_words(schema: Any) -> list[str]:
    words: list[str] = []
    for branch in schema.get("oneOf", schema.get("anyOf", [])):
        if "$ref" in branch:
            name = branch["$ref"].rsplit("/", 1)[-1]
            words.append(_EXPECTED.get(name, name))
        elif "const" in branch:
            words.append(show(branch["const"]))
        elif "enum" in branch:
            words.extend(show(v) for v in branch["enum"])
        elif isinstance(branch.get("type"), str):
            words.append(TYPE_WORDS.get(branch["type"], branch["type"]))
    return words


def _union(err: Any, path: str) -> list[tuple[str, str]]:
    title = _title(err.schema)
    parser = _PARSERS.get(title or "")
    if parser is not None:
        try:
            parser(err.instance)
        except ValueError as exc:
            return [(path, str(exc))]
    branches_schema = err.validator_value
    if all(isinstance(b, dict) and set(b) == {"required"} for b in branches_schema):
        # e.g. clamp: {anyOf: [{required: [min]}, {required: [max]}]}; the one-op-per-edit
        # oneOf of the same shape is a semantic check.
        if err.validator == "oneOf":
            return []
        names = [b["required"][0] for b in branches_schema]
        return [(path, f"needs at least one of {one_of_words(names)}")]
    if (
        not err.context
    ):  # valid under several branches of a oneOf: the schema's fault, not the user's
        return [(path, err.message)]
    branches: dict[int, list[Any]] = {}
    for sub in err.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    candidates = [errs for _, errs in sorted(branches.items()) if not _branch_mismatch(errs)]
    if not candidates:
        expected = _EXPECTED.get(title or "") or one_of_words(_branch_words(err.schema))
        options: list[str] = []
        for branch in branches_schema:
            if isinstance(branch, dict):
                options += [v for v in branch.get("enum", []) if isinstance(v, str)]
                if isinstance(branch.get("const"), str):
                    options.append(branch["const"])
        return [
            (
                path,
                f"expected {expected}; got {show(err.instance)}{did_you_mean(err.instance, options)}",
            )
        ]
    # The branch the user most likely meant: fewest missing keys, then fewest errors.
    best = min(
        candidates, key=lambda errs: (sum(e.validator == "required" for e in errs), len(errs))
    )
    out: list[tuple[str, str]] = []
    for sub in best:
        out += convert(sub)
    return out


def convert(err: Any) -> list[tuple[str, str]]:
    """(path, message) pairs for one jsonschema error (several for several unknown keys)."""
    path = format_path(err.absolute_path)
    kind = err.validator
    value = err.validator_value
    inst = err.instance
    schema = err.schema if isinstance(err.schema, dict) else {}

    if kind in _SEMANTIC:
        return []
    if kind in ("oneOf", "anyOf"):
        return _union(err, path)
    if "propertyNames" in err.relative_schema_path:
        what = "variable name" if path == "vars" else "name"
        rule = (
            _PATTERN_WORDS.get(value, f"must match {value}") if kind == "pattern" else err.message
        )
        return [(join_path(path, inst), f"{what} {inst!r} {rule}")]
    if kind == "additionalProperties":
        allowed = list(schema.get("properties", {}))
        extras = [k for k in inst if k not in allowed]
        return [(join_path(path, k), unknown_key_message(k, path, allowed)) for k in extras]
    if kind == "required":
        missing = [name for name in value if name not in inst]
        return [(path, _required_message(name, path)) for name in missing]
    if kind == "const":
        if path == "nnrun":
            if isinstance(inst, int) and not isinstance(inst, bool):
                return [(path, f"unsupported format version {inst}; this nnrun reads format 1")]
            return [(path, f"the format version must be the number 1, not {show(inst)}")]
        return [(path, f"must be {show(value)}, got {show(inst)}")]
    if kind == "type":
        types = [value] if isinstance(value, str) else list(value)
        return [
            (
                path,
                f"expected {one_of_words(TYPE_WORDS.get(t, t) for t in types)}, got {show(inst)}",
            )
        ]
    if kind == "enum":
        options = [str(v) for v in value]
        alias = _ALIASES.get(inst) if isinstance(inst, str) else None
        hint = f"; did you mean {alias!r}?" if alias in options else did_you_mean(inst, options)
        return [(path, f"{show(inst)} is not one of {', '.join(options)}{hint}")]
    if kind == "pattern":
        if _title(schema) == "Location":
            try:
                parse_location(inst)
            except ValueError as exc:
                return [(path, str(exc))]
        return [(path, f"{show(inst)} {_PATTERN_WORDS.get(value, f'does not match {value}')}")]
    if kind == "minimum":
        return [(path, f"must be at least {value}, got {show(inst)}")]
    if kind == "exclusiveMinimum":
        return [(path, f"must be greater than {value}, got {show(inst)}")]
    if kind == "maximum":
        return [(path, f"must be at most {value}, got {show(inst)}")]
    if kind == "exclusiveMaximum":
        return [(path, f"must be less than {value}, got {show(inst)}")]
    if kind in ("minItems", "minProperties", "minLength"):
        return [(path, "must not be empty" if value == 1 else f"needs at least {value} entries")]
    if kind == "uniqueItems":
        seen: list[Any] = []
        dup = None
        for item in inst:
            if item in seen:
                dup = item
                break
            seen.append(item)
        return [(path, f"lists {show(dup)} more than once")]
    return [(path, err.message)]
