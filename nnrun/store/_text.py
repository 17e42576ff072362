"""Text columns that round-trip any Python string, NUL characters included.

HDF5 variable-length strings end at the first NUL and must be valid UTF-8, but a
model can generate a token that decodes to "\\x00". Such a text is stored twice: in
the column itself with each NUL (or unencodable character) replaced by U+FFFD, so
plain h5py readers still see a readable string, and exactly, as UTF-8 bytes, in
`<column>.exact` with its row number in `<column>.exact_row`. `read_texts` puts the
exact texts back.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

_BYTES = h5py.vlen_dtype(np.uint8)


def _storable(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def storable_texts(group: h5py.Group, column: str, start: int, texts: list[Any]) -> list[Any]:
    """`texts` as the column can hold them; exact copies of the others go beside it.

    `start` is the row of `texts[0]` in the column.
    """
    strings = [t for t in texts if isinstance(t, str)]
    joined = "".join(strings)
    if "\x00" not in joined:
        try:
            joined.encode("utf-8")
            return texts  # the usual case: every text fits as it is (checked at once)
        except UnicodeEncodeError:
            pass
    out: list[Any] = []
    exact_rows: list[int] = []
    exact: list[np.ndarray] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or _storable(text):
            out.append(text)
            continue
        out.append(text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8"))
        exact_rows.append(start + i)
        exact.append(np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8))
    if exact_rows:
        rows = group.get(f"{column}.exact_row") or group.create_dataset(
            f"{column}.exact_row", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(256,)
        )
        values = group.get(f"{column}.exact") or group.create_dataset(
            f"{column}.exact", shape=(0,), maxshape=(None,), dtype=_BYTES, chunks=(256,)
        )
        n = rows.shape[0]
        rows.resize((n + len(exact_rows),))
        values.resize((n + len(exact_rows),))
        rows[n:] = exact_rows
        for j, data in enumerate(exact):
            values[n + j] = data
    return out


def read_texts(group: h5py.Group, column: str) -> list[str]:
    """A text column as Python strings, with the exact texts of `storable_texts` put back."""
    # A sweep's columns have the sweep axes first: rows are counted flat (row-major).
    texts = [
        v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        for v in np.asarray(group[column][()]).ravel()
    ]
    rows = group.get(f"{column}.exact_row")
    values = group.get(f"{column}.exact")
    if isinstance(rows, h5py.Dataset) and isinstance(values, h5py.Dataset):
        for row, data in zip(rows[()], values[()]):
            if 0 <= int(row) < len(texts):
                texts[int(row)] = bytes(np.asarray(data, dtype=np.uint8)).decode(
                    "utf-8", "surrogatepass"
                )
    return texts
