"""/prompts/meta/<field>: the extra fields of a JSONL prompt file, one row per prompt.

A dataset of questions with their answers (`{"text": ..., "answer": " Paris"}`) then
needs no second file: the answers sit beside the prompts in the output. A field whose
values are all strings is a string column ("" where a record lacks it); integers and
booleans an int64 column, numbers with a fraction a float64 column (-1 / NaN where
missing); anything else (lists, objects) is stored as JSON text with `encoding: json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import h5py
import numpy as np

from nnrun.errors import RunError

STR = h5py.string_dtype()


class PromptMeta:
    """Follows the prompt file beside the batches and appends each batch's fields."""

    def __init__(self, records: Callable[[], Iterator[tuple[str, dict[str, Any]]]]) -> None:
        self.records = records  # a fresh iterator over (id, fields) from the file's start
        self.it = records()

    def _next(self, prompt_id: str) -> dict[str, Any]:
        found = next(self.it, None)
        if found is None or found[0] != prompt_id:
            # Rows not in file order (the same prompts again): look the id up afresh.
            self.it = self.records()
            found = next((r for r in self.it if r[0] == prompt_id), None)
        return {} if found is None else found[1]

    def append(self, prompts: h5py.Group, ids: list[str]) -> None:
        rows = [self._next(p) for p in ids]
        group = prompts.require_group("meta")
        fields = list(group) + [f for r in rows for f in r if f not in group]
        for field in dict.fromkeys(fields):
            values = [r.get(field) for r in rows]
            if field not in group:
                _create(group, field, values, before=prompts["id"].shape[0] - len(ids))
            ds = group[field]
            n = ds.shape[0]
            ds.resize((n + len(ids),))
            ds[n:] = _column(ds, field, values)


def _kind(values: list[Any]) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, str) for v in present):
        return "str"
    if present and all(isinstance(v, bool | int) for v in present):
        return "int"
    if present and all(isinstance(v, bool | int | float) for v in present):
        return "float"
    return "json"


def _create(group: h5py.Group, field: str, values: list[Any], before: int) -> None:
    kind = _kind(values)
    dtype = {"int": np.int64, "float": np.float64}.get(kind, STR)
    fill = {"int": -1, "float": np.nan, "json": "null"}.get(kind, "")
    ds = group.create_dataset(
        field, shape=(before,), maxshape=(None,), dtype=dtype, chunks=(1024,), fillvalue=fill
    )
    ds.dims[0].label = "prompt"
    ds.attrs["encoding"] = "json" if kind == "json" else "plain"


def _column(ds: h5py.Dataset, field: str, values: list[Any]) -> Any:
    if ds.attrs.get("encoding") == "json":
        return [json.dumps(v) for v in values]
    if ds.dtype.kind == "O":
        return ["" if v is None else v if isinstance(v, str) else json.dumps(v) for v in values]
    bad = [v for v in values if v is not None and not isinstance(v, bool | int | float)]
    if bad or (ds.dtype.kind == "i" and any(isinstance(v, float) for v in values)):
        raise RunError(
            f"prompts.file: field {field!r} holds numbers in earlier records but "
            f"{(bad or values)[0]!r} here; keep one type per field"
        )
    missing = -1 if ds.dtype.kind == "i" else np.nan
    return np.array([missing if v is None else v for v in values], dtype=ds.dtype)
