"""Compare two output files dataset by dataset: what CI needs to accept or reject a re-run.

Every dataset in either file is compared, wherever it lives (`/saves`, `/prompts`,
`/generation`, `/axes`, and any group added later), so nothing needs to change here
when the layout grows. Floating-point values match within `atol + rtol * |b|` (NaN
matches NaN, an infinity the same infinity); everything else (token ids, lengths,
texts, labels) must match exactly. Root attributes are provenance (versions, times,
device, commit): their differences are listed, never counted against the files.

>>> report = nnrun.diff("a.h5", "b.h5", rtol=1e-5)      # doctest: +SKIP
>>> report.equal, [d.name for d in report.datasets if not d.ok]   # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nnrun.errors import NnrunError

# Elements read from each file at once: bounds memory whatever a dataset's size.
_BLOCK = 1 << 22
_OBJECT_BLOCK = 1 << 14  # strings and other Python objects cost far more per element
# A dataset that declares this many elements while storing next to nothing is a crafted
# (or broken) file: reading it would take hours of fill values, so it is not compared.
_SPARSE_ELEMENTS = 1 << 30
# HDF5 dimension-scale bookkeeping: object references into the same file, never equal
# across files and not data.
_INTERNAL_ATTRS = frozenset({"CLASS", "NAME", "REFERENCE_LIST", "DIMENSION_LIST"})


class UnreadableFile(NnrunError):
    """An input of `diff` is missing or not an HDF5 file (the CLI exits 2)."""


@dataclass
class DatasetDiff:
    """How one dataset compares. `verdict` is one of:

    equal, within tolerance, values differ, shape differs, dtype differs,
    attributes differ, only in A, only in B, unreadable.
    """

    name: str
    verdict: str
    shape: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    dtype: str | None = None
    dtype_b: str | None = None
    max_abs: float | None = None  # largest |a - b| (inf where only one side is NaN)
    max_rel: float | None = None  # largest |a - b| / |b|
    worst: tuple[int, ...] | None = None  # index of the largest difference (or first mismatch)
    a_value: str | None = None  # the values at `worst`, as text
    b_value: str | None = None
    differing: int = 0  # elements beyond tolerance
    size: int = 0
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict in ("equal", "within tolerance")


@dataclass
class AttrDiff:
    """A root attribute (provenance) that differs: shown, never failing."""

    key: str
    a: str | None
    b: str | None


@dataclass
class DiffReport:
    """The result of `diff`: per-dataset rows, provenance differences and notes."""

    a: str
    b: str
    rtol: float
    atol: float
    datasets: list[DatasetDiff] = field(default_factory=list)
    provenance: list[AttrDiff] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        """No dataset differs beyond tolerance (provenance aside)."""
        return all(d.ok for d in self.datasets)

    @property
    def unreadable(self) -> bool:
        return any(d.verdict == "unreadable" for d in self.datasets)

    @property
    def exit_code(self) -> int:
        """0 equal, 1 different, 2 a dataset could not be read."""
        return 2 if self.unreadable else 0 if self.equal else 1

    def as_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (infinities and NaN as strings)."""
        out = asdict(self)
        out["equal"] = self.equal
        out["exit_code"] = self.exit_code
        return _json_safe(out)


def diff(
    a: str | Path,
    b: str | Path,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    only: Sequence[str] = (),
) -> DiffReport:
    """Compare two nnrun output files (any HDF5 files, in fact), dataset by dataset.

    `only` restricts the comparison to the named datasets: a save or metric name
    (`resid` covers /saves/resid, its companions such as resid.indices and
    /axes/resid), a group (`prompts`) or a full path (`/generation/text`).
    Raises UnreadableFile when a file cannot be opened, or when `only` names
    nothing in either file.
    """
    for tol, name in ((rtol, "rtol"), (atol, "atol")):
        if not (isinstance(tol, int | float) and math.isfinite(tol) and tol >= 0):
            raise NnrunError(f"{name} must be a finite number >= 0, not {tol!r}")
    report = DiffReport(str(a), str(b), float(rtol), float(atol))
    with _open(a) as fa, _open(b) as fb:
        names_a, names_b = _datasets(fa), _datasets(fb)
        names = sorted(set(names_a) | set(names_b))
        if only:
            chosen = [n for n in names if any(_selected(n, wanted) for wanted in only)]
            if not chosen:
                raise UnreadableFile(
                    f"--only {' '.join(only)} matches no dataset in either file "
                    f"(datasets: {', '.join(names[:20]) or 'none'})"
                )
            names = chosen
        for name in names:
            if name not in names_b:
                report.datasets.append(_one_sided(name, fa, "only in A"))
            elif name not in names_a:
                report.datasets.append(_one_sided(name, fb, "only in B"))
            else:
                report.datasets.append(_compare(name, fa[name], fb[name], rtol, atol))
        report.provenance = _attr_diffs(fa.attrs, fb.attrs)
        for label, f in (("A", fa), ("B", fb)):
            status = _attr_text(f.attrs, "status")
            if status != "complete":
                report.notes.append(f"{label} has status {status or 'missing'}, not complete")
    return report


# -- reading -----------------------------------------------------------------------


class _open:  # noqa: N801 - a context manager used like a function
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> h5py.File:
        if not os.path.isfile(self.path):
            what = "is a directory" if os.path.isdir(self.path) else "does not exist"
            raise UnreadableFile(f"{self.path} {what}")
        try:
            self.file = h5py.File(self.path, "r")
        except (OSError, ValueError) as e:
            raise UnreadableFile(f"cannot read {self.path} as HDF5: {_one_line(e)}") from None
        return self.file

    def __exit__(self, *exc: Any) -> None:
        self.file.close()


def _datasets(f: h5py.File) -> list[str]:
    """Every dataset reachable by hard links, as absolute paths (links are not data)."""
    found: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found.append("/" + name)

    try:
        f.visititems(visit)
    except (RuntimeError, OSError, KeyError, ValueError) as e:
        raise UnreadableFile(f"cannot list the datasets of {f.filename}: {_one_line(e)}") from None
    return found


def _selected(name: str, wanted: str) -> bool:
    path = name.lstrip("/")
    wanted = wanted.strip("/")
    if path == wanted or path.startswith(wanted + "/"):
        return True
    for group in ("saves", "metrics"):
        if path == f"{group}/{wanted}" or path.startswith(f"{group}/{wanted}."):
            return True
    return path.startswith(f"axes/{wanted}/")


def _describe(ds: h5py.Dataset) -> tuple[tuple[int, ...] | None, str]:
    return (None if ds.shape is None else tuple(ds.shape)), str(ds.dtype)


def _one_sided(name: str, f: h5py.File, verdict: str) -> DatasetDiff:
    try:
        shape, dtype = _describe(f[name])
    except Exception as e:  # noqa: BLE001 - a crafted file can fail in any h5py call
        return DatasetDiff(name, "unreadable", note=_one_line(e))
    if verdict == "only in A":
        return DatasetDiff(name, verdict, shape=shape, dtype=dtype)
    return DatasetDiff(name, verdict, shape_b=shape, dtype_b=dtype)


# -- comparing -----------------------------------------------------------------------


def _compare(name: str, da: Any, db: Any, rtol: float, atol: float) -> DatasetDiff:
    try:
        shape, dtype = _describe(da)
        shape_b, dtype_b = _describe(db)
    except Exception as e:  # noqa: BLE001
        return DatasetDiff(name, "unreadable", note=_one_line(e))
    row = DatasetDiff(name, "equal", shape, shape_b, dtype, dtype_b)
    if shape != shape_b:
        row.verdict = "shape differs"
        return row
    if shape is None:  # both empty dataspaces: nothing to compare
        return row
    row.size = math.prod(shape)
    sparse = _sparse(da) or _sparse(db)
    if sparse:
        row.verdict, row.note = "unreadable", sparse
        return row
    try:
        numeric = _numeric(da.dtype) and _numeric(db.dtype)
        if numeric:
            _compare_numeric(row, da, db, rtol, atol)
        else:
            _compare_exact(row, da, db)
    except Exception as e:  # noqa: BLE001 - crafted dtypes fail in many ways; none is fatal
        row.verdict, row.note = "unreadable", _one_line(e)
        return row
    if row.differing:
        row.verdict = "values differ"
    elif row.max_abs:
        row.verdict = "within tolerance"
    if dtype != dtype_b and row.ok:
        row.verdict = "dtype differs"
    attrs = _attr_diffs(da.attrs, db.attrs, skip=_INTERNAL_ATTRS)
    if attrs:
        row.note = "attributes differ: " + ", ".join(d.key for d in attrs)
        if row.ok:
            row.verdict = "attributes differ"
    return row


def _numeric(dtype: np.dtype) -> bool:
    return dtype.kind in "biufc"


def _sparse(ds: h5py.Dataset) -> str:
    """Why a dataset is not worth reading (declared huge, stored next to nothing), or ''."""
    size = math.prod(ds.shape or ())
    if size < _SPARSE_ELEMENTS:
        return ""
    stored = ds.id.get_storage_size()
    if stored * 1000 >= size * max(1, ds.dtype.itemsize):
        return ""
    return f"declares {size:,} elements but stores only {stored:,} bytes; not compared"


def _blocks(shape: tuple[int, ...], limit: int) -> Iterator[tuple[Any, ...]]:
    """Selections that cover an array in row-major order, each at most `limit` elements."""
    if not shape:
        yield ()
        return
    inner, axis = 1, len(shape) - 1
    while axis > 0 and inner * shape[axis] <= limit:
        inner *= shape[axis]
        axis -= 1
    step = max(1, limit // inner)
    for outer in itertools.product(*(range(n) for n in shape[:axis])):
        for start in range(0, shape[axis], step):
            yield outer + (slice(start, min(start + step, shape[axis])),)


def _global_index(selection: tuple[Any, ...], local: tuple[int, ...]) -> tuple[int, ...]:
    """The index in the whole dataset of `local`, an index into the block `selection` read."""
    if not selection:
        return ()
    ints = [s for s in selection if isinstance(s, int)]
    sliced = selection[len(ints)]
    return (*ints, sliced.start + local[0], *local[1:])


def _read(ds: h5py.Dataset, selection: tuple[Any, ...]) -> np.ndarray:
    return np.asarray(ds[selection] if selection else ds[()])


def _compare_numeric(row: DatasetDiff, da: Any, db: Any, rtol: float, atol: float) -> None:
    exact = not (da.dtype.kind in "fc" or db.dtype.kind in "fc")
    worst = -1.0
    for sel in _blocks(row.shape or (), _BLOCK):
        a, b = _read(da, sel), _read(db, sel)
        if exact:
            bad = a != b
            # Integers: differences in float64 are for the report only.
            delta = np.abs(a.astype(np.float64) - b.astype(np.float64))
            rel_base = np.abs(b.astype(np.float64))
        else:
            a64 = a.astype(np.complex128 if a.dtype.kind == "c" else np.float64)
            b64 = b.astype(np.complex128 if b.dtype.kind == "c" else np.float64)
            nan_a, nan_b = np.isnan(a64), np.isnan(b64)
            with np.errstate(invalid="ignore", over="ignore"):
                delta = np.abs(a64 - b64)
                delta = np.where((a64 == b64) | (nan_a & nan_b), 0.0, delta)  # inf == inf, NaN/NaN
                delta = np.where(np.isnan(delta), np.inf, delta)  # NaN on one side only
                rel_base = np.abs(b64)
                # No tolerance excuses NaN against a number, or an infinity against anything else.
                special = (nan_a ^ nan_b) | ((np.isinf(a64) | np.isinf(b64)) & (a64 != b64))
                bad = special | (delta > atol + rtol * np.where(np.isfinite(rel_base), rel_base, 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(delta == 0, 0.0, delta / rel_base)
        row.differing += int(np.count_nonzero(bad))
        if delta.size == 0:
            continue
        flat = int(np.argmax(delta))
        top = float(delta.flat[flat])
        if top > worst or (row.worst is None and top == worst):
            worst = top
            local = np.unravel_index(flat, delta.shape) if delta.ndim else ()
            row.worst = _global_index(sel, tuple(int(i) for i in local))
            row.a_value, row.b_value = _show(a[local]), _show(b[local])
        row.max_rel = max(row.max_rel or 0.0, float(np.max(rel)))
    row.max_abs = max(worst, 0.0)
    if not row.max_abs:
        row.worst = row.a_value = row.b_value = None


def _compare_exact(row: DatasetDiff, da: Any, db: Any) -> None:
    for sel in _blocks(row.shape or (), _OBJECT_BLOCK):
        a, b = _read(da, sel), _read(db, sel)
        if a.dtype.kind in "OV" or b.dtype.kind in "OV" or a.dtype != b.dtype:
            flat_a, flat_b = a.reshape(-1), b.reshape(-1)
            bad = np.fromiter(
                (not _same(x, y) for x, y in zip(flat_a, flat_b)), dtype=bool, count=a.size
            ).reshape(a.shape)
        else:
            bad = np.asarray(a != b)
        count = int(np.count_nonzero(bad))
        if count and row.worst is None:
            local = np.unravel_index(int(np.argmax(bad)), bad.shape) if bad.ndim else ()
            row.worst = _global_index(sel, tuple(int(i) for i in local))
            row.a_value, row.b_value = _show(a[local]), _show(b[local])
        row.differing += count


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            return False
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        return bool(np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"))
    try:
        equal = x == y
        return bool(equal) if np.ndim(equal) == 0 else bool(np.all(equal))
    except Exception:  # noqa: BLE001 - references and other oddities
        return repr(x) == repr(y)


# -- attributes -----------------------------------------------------------------------


def _attr_text(attrs: Any, key: str) -> str | None:
    try:
        value = attrs[key]
    except Exception:  # noqa: BLE001 - missing, or a type h5py cannot read
        return None if key not in _safe_keys(attrs) else "<unreadable>"
    return _show(value, limit=None)


def _safe_keys(attrs: Any) -> list[str]:
    try:
        return list(attrs.keys())
    except Exception:  # noqa: BLE001
        return []


def _attr_diffs(a: Any, b: Any, skip: frozenset[str] = frozenset()) -> list[AttrDiff]:
    keys = sorted((set(_safe_keys(a)) | set(_safe_keys(b))) - skip)
    out = []
    for key in keys:
        va, vb = _attr_text(a, key), _attr_text(b, key)
        if va != vb:
            out.append(AttrDiff(key, va, vb))
    return out


# -- text --------------------------------------------------------------------------


def _show(value: Any, limit: int | None = 60) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    elif isinstance(value, np.ndarray) and value.dtype.kind in "OS":
        value = [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value.tolist()
        ]
    elif isinstance(value, np.generic):
        value = value.item()
    text = value if isinstance(value, str) else repr(value)
    if isinstance(value, str) and limit is not None:
        text = repr(value)
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
