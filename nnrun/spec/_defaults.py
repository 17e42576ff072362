"""Fill in defaults where the user left keys out (never overriding what was written)."""

from __future__ import annotations

import re
from typing import Any

from ._constants import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BUILTIN_MODEL,
    DEFAULT_NAME,
    DEFAULT_SEED,
    MODEL_DEFAULTS,
    MODEL_SOURCES,
    PROMPT_FILE_DEFAULTS,
)
from ._paths import join_path


def default_name(stem: str | None) -> str:
    """The experiment name for a spec file: its stem, made a valid name."""
    if not stem:
        return DEFAULT_NAME
    # Names end up in file names and HDF5 attributes: keep to the characters the schema allows.
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-")
    return name or DEFAULT_NAME


def normalise_prompts(data: dict[str, Any], lines: dict[str, int]) -> None:
    """A list of prompt texts becomes a mapping p0, p1, ... (batch order kept).

    A list holding anything but strings is left alone so that validation reports it at
    the user's own path (``prompts[2]``)."""
    prompts = data.get("prompts")
    if isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts):
        data["prompts"] = {f"p{i}": text for i, text in enumerate(prompts)}
        for i in range(len(prompts)):
            line = lines.get(join_path("prompts", i))
            if line is not None:
                lines.setdefault(join_path("prompts", f"p{i}"), line)


PROMPT_FILE_KEYS = frozenset({"file", "field", "id_field", "limit"})


def is_prompt_file(prompts: Any) -> bool:
    """Whether `prompts:` names a file. A lone prompt whose id happens to be "file" is
    still text: a file source has only the source keys."""
    return isinstance(prompts, dict) and "file" in prompts and set(prompts) <= PROMPT_FILE_KEYS


def fill_defaults(data: dict[str, Any], stem: str | None) -> None:
    """Fill defaults in place; containers of the wrong type are left for validation."""
    data.setdefault("name", default_name(stem))
    data.setdefault("seed", DEFAULT_SEED)
    data.setdefault("batch_size", DEFAULT_BATCH_SIZE)
    if "output" not in data:
        data["output"] = f"runs/{data['name']}.h5"

    model = data.setdefault("model", {})
    if isinstance(model, dict):
        if not any(key in model for key in MODEL_SOURCES):
            model["builtin"] = DEFAULT_BUILTIN_MODEL
        for key, value in MODEL_DEFAULTS.items():
            # A device_map places the model itself; a default device would contradict it.
            if key == "device" and "device_map" in model:
                continue
            model.setdefault(key, value)

    prompts = data.get("prompts")
    if isinstance(prompts, dict) and "file" in prompts:
        for key, value in PROMPT_FILE_DEFAULTS.items():
            prompts.setdefault(key, value)

    saves = data.get("save")
    if isinstance(saves, dict):
        for save in saves.values():
            if isinstance(save, dict):
                save.setdefault("prompts", "all")
                save.setdefault("tokens", "all")
                save.setdefault("steps", "all")
                save.setdefault("apply", [])
                save.setdefault("before_edits", False)

    metrics = data.get("metrics")
    if isinstance(metrics, dict):
        for metric in metrics.values():
            if isinstance(metric, dict):
                metric.setdefault("prompts", "all")
                metric.setdefault("token", -1)
                metric.setdefault("step", 0)

    backward = data.get("backward")
    if isinstance(backward, dict):
        backward.setdefault("reduce", "sum")
        loss = backward.get("loss")
        if isinstance(loss, dict):
            loss.setdefault("prompts", "all")
            loss.setdefault("tokens", "all")  # summed over the selected tokens
            loss.setdefault("apply", [])

    edits = data.get("edits")
    if isinstance(edits, list):
        for edit in edits:
            if isinstance(edit, dict):
                edit.setdefault("prompts", "all")
                edit.setdefault("tokens", "all")
                edit.setdefault("steps", "all")
