"""`nnrun reproduce`: re-run the spec stored in an output file and diff the two files.

A published output carries the spec that produced it (the resolved spec, with `-o`
and every `-s` override applied), a sha256 of every input file it read, and the
provenance of model and software. Reproducing runs that spec again on this machine
into a temporary file and compares every dataset (`nnrun.diff`). Nothing in the
file is executed: the spec is data, validated like any other, and a stored
`trust_remote_code: true` is refused unless the caller allows it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from nnrun.errors import NnrunError

# Default tolerances by the device that ran the reproduction: CPU kernels are
# deterministic, so a CPU re-run must give the same bytes; GPU kernels (cuBLAS, SDPA)
# may pick other reduction orders, so their results are compared within float noise.
EXACT = (0.0, 0.0)
GPU_TOLERANCES = {"float32": (1e-4, 1e-5), "float16": (1e-2, 1e-3), "bfloat16": (2e-2, 1e-2)}


@dataclass
class Reproduction:
    """What `reproduce` did: the diff of the two files and how it was run."""

    original: Path
    rerun: Path | None  # the re-run's file when kept (`keep=`), else None
    diff: Any  # nnrun.store.DiffReport
    rtol: float
    atol: float
    device: str  # where the re-run ran
    overrides: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 equal within tolerance, 1 different, 2 unreadable (as `nnrun diff`)."""
        return self.diff.exit_code


def stored_spec(path: Path) -> tuple[str, dict[str, Any]]:
    """The spec text and root attributes of an output file, read without running anything."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: f.attrs[k] for k in f.attrs}
    except OSError as e:
        raise NnrunError(f"cannot read '{path}' as an HDF5 file: {e}") from None
    text = attrs.get("spec")
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not isinstance(text, str) or not text.strip():
        raise NnrunError(f"{path} stores no spec (attribute 'spec'): it cannot be reproduced")
    return text, attrs


def reproduce(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    rtol: float | None = None,
    atol: float | None = None,
    allow_changed_inputs: bool = False,
    trust_remote_code: bool = False,
    keep: str | Path | None = None,
    progress: Callable[[Any], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Reproduction:
    """Re-run the spec stored in `path` and compare the new output with it.

    `overrides` (`-s key=value`) change the stored spec first, e.g. to point CI at
    another copy of the model (`model.path=...`); they are reported. Inputs whose
    recorded sha256 no longer matches (or that are gone) stop the reproduction unless
    `allow_changed_inputs`. Tolerances default to exact for a CPU re-run and to
    float noise for a GPU one (see GPU_TOLERANCES). `keep` names a file to keep
    the re-run's output in; by default it is written to a temporary directory and
    removed.

    >>> report = nnrun.reproduce("runs/published.h5")   # doctest: +SKIP
    >>> report.exit_code, [d.name for d in report.diff.datasets if not d.ok]
    (0, [])
    """
    from nnrun import api
    from nnrun.spec import check_spec
    from nnrun.store import changed_inputs
    from nnrun.store import diff as diff_files

    original = Path(path)
    text, attrs = stored_spec(original)
    notes: list[str] = []
    loaded = check_spec(text, list(overrides))
    model = loaded.data.get("model", {})
    if isinstance(model, dict) and model.get("trust_remote_code") and not trust_remote_code:
        raise NnrunError(
            f"{original} asks to run the model's own code (trust_remote_code: true); "
            "reproduce it only if you trust where it came from: add --trust-remote-code"
        )
    recorded = attrs.get("inputs")
    if recorded is not None:
        changed = changed_inputs(recorded if not isinstance(recorded, bytes) else recorded.decode())
        if changed and not allow_changed_inputs:
            raise NnrunError(
                "the inputs differ from the ones the file recorded: "
                + "; ".join(changed)
                + " (--allow-changed-inputs to reproduce anyway)"
            )
        notes += [f"input changed (allowed): {c}" for c in changed]
    if overrides:
        notes.append("overrides: " + " ".join(f"-s {o}" for o in overrides))
    workdir = Path(tempfile.mkdtemp(prefix="nnrun-reproduce-"))
    try:
        target = Path(keep) if keep is not None else workdir / original.name
        with _threads(attrs.get("torch_num_threads"), notes):
            results = api.run(
                loaded, output=target, overwrite=keep is not None, progress=progress, log=log
            )
        device = str(results.attrs.get("device", "cpu"))
        if rtol is None or atol is None:
            dtype = str(loaded.points()[0].data.get("model", {}).get("dtype", "float32"))
            default = EXACT if device == "cpu" else GPU_TOLERANCES.get(dtype, (1e-3, 1e-4))
            rtol = default[0] if rtol is None else rtol
            atol = default[1] if atol is None else atol
        report = diff_files(original, results.path, rtol=rtol, atol=atol)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if attrs.get("device") is not None and str(attrs.get("device")) != device:
        notes.append(f"the file was written on {attrs.get('device')}, reproduced on {device}")
    return Reproduction(
        original=original,
        rerun=Path(keep) if keep is not None else None,
        diff=report,
        rtol=rtol,
        atol=atol,
        device=device,
        overrides=list(overrides),
        notes=notes,
    )


@contextmanager
def _threads(recorded: Any, notes: list[str]) -> Iterator[None]:
    """Run with the torch thread count the file was written with (CPU sums depend on it)."""
    import torch

    before = torch.get_num_threads()
    try:
        wanted = int(recorded)
    except (TypeError, ValueError):
        wanted = before
    if wanted != before and wanted >= 1:
        torch.set_num_threads(wanted)
        notes.append(f"torch threads set to {wanted} as recorded (this process had {before})")
    try:
        yield
    finally:
        torch.set_num_threads(before)
