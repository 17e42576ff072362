"""What `nnrun show` prints about a file: its saves, and top next tokens of logits.

Only the file is read (and a tokenizer for the top tokens): nothing here loads a
model or imports the run's machinery, so `nnrun show` opens in a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nnrun.store._reader import Results
from nnrun.store._view import is_packed, padded_shape


def describe_saves(results: Results) -> dict[str, dict[str, Any]]:
    """Axes, shape, dtype and size of every dataset under /saves.

    The shape is what a reader gets back (the padded view, also for a save stored
    packed, which says so); the bytes are what the file stores.

    A file from elsewhere may be damaged or crafted: what cannot be read is
    shown as such instead of failing.
    """
    import math

    import h5py

    rows: dict[str, dict[str, Any]] = {}
    with h5py.File(results.path, "r") as f:
        for name in results:
            ds = f["saves"][name]
            axes = _axes_or_none(results, name)
            shape = ds.shape  # as stored: a packed save's bytes are its real tokens
            view = "(empty)" if shape is None else str(tuple(shape))
            if shape is not None and is_packed(ds):  # the shape readers get back
                try:
                    stored = json.loads(ds.attrs["axes"])  # (sweep..., packed, ...)
                    tokens = shape[stored.index("packed")]
                    view = f"{padded_shape(ds)} (stored packed: {tokens:,} tokens)"
                except (KeyError, ValueError, TypeError, OSError, IndexError, AttributeError):
                    view = f"{tuple(shape)} (packed; its offsets are unreadable)"
            dtype = ds.attrs.get("torch_dtype", ds.dtype)
            rows[name] = {
                "axes": "(unreadable axes attribute)" if axes is None else ", ".join(axes),
                "shape": view,
                "dtype": dtype.decode("utf-8", "replace")
                if isinstance(dtype, bytes)
                else str(dtype),
                "bytes": 0 if shape is None else math.prod(shape) * ds.dtype.itemsize,
            }
    return rows


def _axes_or_none(results: Results, name: str) -> list[str] | None:
    from nnrun.errors import NnrunError

    try:
        return results.axes(name)
    except NnrunError:
        return None


# Logits read for the top-tokens table at most (a file from elsewhere may declare any size).
_TOP_TOKENS_MAX_ELEMENTS = 1 << 28


def top_next_tokens(results: Results, k: int = 5) -> dict[str, dict[str, list[tuple[str, float]]]]:
    """For saves of raw logits at one token: each prompt's top-k next tokens.

    Returns {save: {prompt id: [(token text, probability), ...]}}; saves that
    are not logits at a single position are skipped. The tokenizer is loaded
    from the model directory recorded in the file, from local files only and
    never with its own code (`nnrun run` uses this for the file it just wrote;
    `nnrun show` does not, since a file from elsewhere could name any directory).
    """
    import math

    import h5py
    import numpy as np

    found: dict[str, dict[str, list[tuple[str, float]]]] = {}
    # Only (prompt, token, vocab) saves: with layer or step axes there is no
    # single "next token" per prompt.
    candidates = []
    with h5py.File(results.path, "r") as f:
        for name in results:
            ds = f["saves"][name]
            if (
                _axes_or_none(results, name) == ["prompt", "token", "vocab"]
                and ds.dtype.kind == "f"
                and ds.ndim == 3
                and ds.shape[1] == 1
                and math.prod(ds.shape) <= _TOP_TOKENS_MAX_ELEMENTS
            ):
                candidates.append(name)
    path = results.attrs.get("model_resolved_path")
    if not candidates or not isinstance(path, str) or not Path(path).is_dir():
        return found
    try:
        tokenizer = results.tokenizer()  # local files only, never the tokenizer's own code
    except Exception:  # any tokenizer problem only costs the table, never the run
        return found
    for name in candidates:
        logits = results.array(name)  # (prompt, token, vocab)
        by_prompt = {}
        for prompt, row in zip(results.prompt_ids(name), logits[:, 0].astype(np.float64)):
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            top = np.argsort(-probs)[:k]
            by_prompt[prompt] = [(tokenizer.decode([int(i)]), float(probs[i])) for i in top]
        found[name] = by_prompt
    return found
