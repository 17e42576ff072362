"""Small helpers shared by the engine, store and CLI tests."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
NNRUN = REPO / ".venv" / "bin" / "nnrun"


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models are many times faster so on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def placement_overrides() -> dict[str, str]:
    """The model.device / model.dtype the conformance tests run nnrun with, read from
    NNRUN_TEST_DEVICE and NNRUN_TEST_DTYPE (benchmarks/gpu.sh sets them to run the
    tests on cuda in fp32 and bf16). Empty when neither is set: the specs keep their
    defaults, and everything runs as it always has."""
    found = {}
    for key, var in (("device", "NNRUN_TEST_DEVICE"), ("dtype", "NNRUN_TEST_DTYPE")):
        if os.environ.get(var):
            found[key] = os.environ[var]
    return found


# The last line of a child process that reports its peak memory (KiB). VmHWM, not
# ru_maxrss: the latter keeps the parent's size across fork and exec, so a child of a
# big test process would report the parent's peak.
PRINT_PEAK_RSS = (
    'print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])'
)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def hooks_by_module(model: Any) -> dict[str, tuple[int, int]]:
    """name -> (forward hooks, forward pre-hooks) for every module that has any."""
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    }


def assert_no_hooks(model: Any) -> None:
    left = hooks_by_module(model)
    assert left == {}, f"hooks left on modules: {left}"


def h5_str(value: Any) -> Any:
    """h5py strings come back as bytes in datasets: make them str."""
    if isinstance(value, bytes):
        return value.decode()
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [h5_str(v) for v in value]
    return value


# Root attributes that say when, where and how a file was made, not what it holds.
PROVENANCE_ATTRS = frozenset(
    {
        "command",
        "started_utc",
        "finished_utc",
        "resumed_utc",
        "git_commit",
        "git_dirty",
        "executor",
        "device",
        "model_device",
        # The spec records the file it was written to; the files compared differ there.
        "spec_sha256",
    }
)
# Attributes holding references into their own file (dimension scales): compared as labels.
_REFERENCE_ATTRS = frozenset({"DIMENSION_LIST", "REFERENCE_LIST"})


def assert_same_output(
    a: Path, b: Path, *, rtol: float = 1e-5, atol: float = 1e-6, skip: frozenset[str] = frozenset()
) -> None:
    """Two output files hold the same datasets, attributes and values.

    Floats compare with allclose (NaN padding equal to NaN), everything else exactly;
    every dataset's attributes and axis labels must match; root attributes must match
    except provenance (times, command, device: PROVENANCE_ATTRS) and `skip`.
    (`nnrun diff` from the reproduce work compares values the same way.)
    """
    import h5py
    import numpy as np

    from nnrun.store import padded_values

    def tree(f: Any) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def visit(name: str, obj: Any) -> None:  # a value returned would stop the walk
            found[name] = obj

        f.visititems(visit)
        return found

    def same_attr(u: Any, v: Any) -> bool:
        if isinstance(u, np.ndarray) and np.array_equal(u, v, equal_nan=u.dtype.kind == "f"):
            return True
        if isinstance(u, float) and isinstance(v, float) and np.isnan(u) and np.isnan(v):
            return True  # a float save's NaN fill value
        return h5_str(u) == h5_str(v)

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        ta, tb = tree(fa), tree(fb)
        assert sorted(ta) == sorted(tb), f"only in one file: {sorted(set(ta) ^ set(tb))}"
        ignored = PROVENANCE_ATTRS | skip
        for key in set(fa.attrs) | set(fb.attrs):
            if key in ignored:
                continue
            assert key in fa.attrs and key in fb.attrs, f"root attribute {key} in one file only"
            if key == "spec":  # the same spec, but for the output file each was written to
                specs = [yaml.safe_load(h5_str(f.attrs[key])) for f in (fa, fb)]
                for spec in specs:
                    spec.pop("output", None)
                assert specs[0] == specs[1], "root attribute spec"
                continue
            assert h5_str(fa.attrs[key]) == h5_str(fb.attrs[key]), f"root attribute {key}"
        packed_offsets = {
            h5_str(ds.attrs["offsets"]).lstrip("/")
            for ds in ta.values()
            if isinstance(ds, h5py.Dataset) and h5_str(ds.attrs.get("layout", "")) == "packed"
        }
        for name, x in ta.items():
            y = tb[name]
            assert type(x) is type(y), name
            keys = set(x.attrs) - _REFERENCE_ATTRS
            assert keys == set(y.attrs) - _REFERENCE_ATTRS, f"/{name}: attributes differ"
            for key in keys:
                u, v = x.attrs[key], y.attrs[key]
                assert same_attr(u, v), f"/{name} @{key}: {u!r} != {v!r}"
            if not isinstance(x, h5py.Dataset):
                continue
            if name in packed_offsets:
                # Where each prompt's tokens sit on a packed save's flat axis follows the
                # order rows were written in, which packing and sharding may change; the
                # values those offsets lead to are compared below, through the padded view.
                assert x.shape == y.shape, f"/{name}: shape {x.shape} != {y.shape}"
                continue
            if h5_str(x.attrs.get("layout", "")) == "packed":
                u, v = padded_values(x), padded_values(y)
                assert u.shape == v.shape, f"/{name}: padded view {u.shape} != {v.shape}"
                assert np.allclose(u, v, rtol=rtol, atol=atol, equal_nan=True), (
                    f"/{name}: padded views differ"
                )
                continue
            assert x.shape == y.shape, f"/{name}: shape {x.shape} != {y.shape}"
            assert x.dtype == y.dtype, f"/{name}: dtype {x.dtype} != {y.dtype}"
            assert [d.label for d in x.dims] == [d.label for d in y.dims], f"/{name}: axes"
            if x.dtype.kind == "f":
                u, v = x[()], y[()]
                assert np.allclose(u, v, rtol=rtol, atol=atol, equal_nan=True), (
                    f"/{name}: max difference {np.nanmax(np.abs(u - v))}"
                )
            else:
                assert np.array_equal(x[()], y[()]), f"/{name}: values differ"
