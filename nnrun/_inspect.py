"""What the inspecting verbs show: `nnrun modules`, `nnrun tokens`, decoded saves.

Plain data for the CLI to print; no printing here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from nnrun.spec import LoadedSpec, parse_token_selection

# -- nnrun modules ------------------------------------------------------------------------


def collapse_layers(rows: list[Any]) -> list[Any]:
    """Rows of repeated blocks shown once: `model.layers.{0..29}.mlp` for 30 layers.

    A ModuleList whose children all have one class is a run of repeated blocks; the
    rows of its first child stand for all of them (their shapes are the same).
    """
    lists: dict[str, int] = {}
    classes: dict[str, set[str]] = {}
    for row in rows:
        m = re.fullmatch(r"(.*)\.(\d+)", row.path)
        if m:
            classes.setdefault(m.group(1), set()).add(row.cls)
    for row in rows:
        if row.cls == "ModuleList" and len(classes.get(row.path, ())) == 1:
            lists[row.path] = sum(
                1 for r in rows if re.fullmatch(rf"{re.escape(row.path)}\.\d+", r.path)
            )
    if not lists:
        return rows
    out = []
    for row in rows:
        for prefix, count in lists.items():
            m = re.match(rf"{re.escape(prefix)}\.(\d+)(?=\.|$)", row.path)
            if m and count > 1:
                if m.group(1) != "0":
                    row = None
                else:
                    span = f"{{0..{count - 1}}}"
                    row = replace(
                        row,
                        path=f"{prefix}.{span}{row.path[m.end() :]}",
                        standard=re.sub(r"@layers\.0(?=\.|$)", f"@layers.{span}", row.standard),
                    )
                break
        if row is not None:
            out.append(row)
    return out


def grep_rows(rows: list[Any], pattern: str) -> list[Any]:
    """Rows whose path, class or standard name matches `pattern` (a regular expression,
    case-insensitive; plain text works too)."""
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error:
        regex = re.compile(re.escape(pattern), re.IGNORECASE)
    return [
        r for r in rows if regex.search(r.path) or regex.search(r.cls) or regex.search(r.standard)
    ]


# -- nnrun tokens -------------------------------------------------------------------------


@dataclass
class PromptTokens:
    """One prompt as the model sees it: its tokens, and which saves/edits select each."""

    prompt: str
    text: str
    ids: list[int]
    tokens: list[str]  # each token decoded on its own
    selected: dict[int, list[str]]  # position -> "save resid", "edits[0]" selecting it
    problems: list[str]  # selections that fail on this prompt (find absent, beyond)


def prompt_tokens(spec: LoadedSpec, tokenizer: Any, limit: int | None = None) -> list[PromptTokens]:
    """Each prompt of the spec tokenized as a run tokenizes it (chat templates applied).

    Positions are what `tokens:` counts; `selected` says which saves and edits pick
    each position of this prompt.
    """
    from itertools import islice

    from nnrun.compile._compile import _prompt_source
    from nnrun.engine._batch import iter_prompts
    from nnrun.models._tokens import find_tokens, token_strings

    data = spec.data
    source = _prompt_source(data["prompts"], tokenizer, bool(data.get("chat_template")))
    actions = [
        (f"save {name}", save.get("prompts", "all"), save.get("tokens", "all"))
        for name, save in (data.get("save") or {}).items()
    ] + [
        (f"edits[{i}]", edit.get("prompts", "all"), edit.get("tokens", "all"))
        for i, edit in enumerate(data.get("edits") or [])
    ]
    out = []
    for prompt, text in islice(iter_prompts(source, tokenizer), limit):
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        selected: dict[int, list[str]] = {}
        problems = []
        for label, prompts, tokens in actions:
            if prompts != "all" and prompt not in prompts:
                continue
            selection = parse_token_selection(tokens)
            try:
                positions = selection.resolve(
                    len(ids), lambda t, o, s=text, i=ids: find_tokens(tokenizer, s, i, t, o)
                )
            except (IndexError, LookupError) as e:
                problems.append(f"{label}: tokens {selection}: {e}")
                continue
            for p in positions:
                selected.setdefault(p, []).append(label)
        out.append(
            PromptTokens(prompt, text, ids, token_strings(tokenizer, ids), selected, problems)
        )
    return out


# -- decoded saves ------------------------------------------------------------------------


@dataclass
class DecodedRow:
    """One row of a decoded save: its labels and the token strings (with values)."""

    labels: dict[str, Any]  # prompt, layer, step, token
    tokens: list[tuple[str, float | None]]


def decodable(results: Any) -> list[str]:
    """Saves that hold token ids: top-k (with `<name>.indices`) and argmax saves."""
    import json

    import h5py

    found = []
    with h5py.File(results.path, "r") as f:
        for name, ds in f["saves"].items():
            apply = json.loads(ds.attrs.get("apply", "[]"))
            last = apply[-1] if apply else None
            if name.endswith(".indices"):
                continue
            if isinstance(last, dict) and "topk" in last and f"{name}.indices" in f["saves"]:
                found.append(name)
            elif last == "argmax":
                found.append(name)
    return found


def decode_save(
    results: Any, name: str, tokenizer: Any, max_rows: int | None = None
) -> list[DecodedRow]:
    """A top-k or argmax save as token strings, one row per (prompt, layer, step, token).

    For top-k the value beside each token is the saved value (a probability after
    softmax); argmax rows have none. Padded entries are left out.
    """
    from nnrun.models._tokens import token_strings

    axes = results.axes(name)
    topk = f"{name}.indices" in results
    ids = results.array(f"{name}.indices" if topk else name)
    values = results.array(name) if topk else None
    if not topk:  # argmax: the ids are the last axis' entries; give each its own k slot
        ids = ids[..., None]
    lead = axes[: ids.ndim - 1]
    labels = {axis: results.labels(name, axis) for axis in lead}
    rows: list[DecodedRow] = []
    for index in np.ndindex(*ids.shape[:-1]):
        row_ids = ids[index]
        if (row_ids < 0).any():
            continue  # a padded entry of a ragged axis
        found = {
            axis: labels[axis][i] if labels[axis] is not None and i < len(labels[axis]) else i
            for axis, i in zip(lead, index)
        }
        texts = token_strings(tokenizer, row_ids.tolist())
        vals = [None] * len(texts) if values is None else [float(v) for v in values[index]]
        rows.append(DecodedRow(found, list(zip(texts, vals))))
        if max_rows is not None and len(rows) >= max_rows:
            break
    return rows


def layer_label(site: str) -> str:
    """A short layer label for a site: `model.layers.3.output` -> `3`."""
    m = re.search(r"\.(\d+)(?:\.[A-Za-z_]\w*)*(?:\[\d+\])*$", site)
    return m.group(1) if m else site
