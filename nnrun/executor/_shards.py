"""Shards: the pieces of a run that workers execute independently.

A shard is a set of sweep points, a window of a prompt file (a run without a sweep),
or, for a run with inline prompts and no sweep, the whole run. Each shard runs
through the ordinary local loop (`SweepRunner` into an `OutputWriter`) into a file of
its own, so a shard file is a normal output file: a sweep's shard has the sweep's
full layout with only its points written. Nothing here imports Ray.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nnrun.errors import NnrunError
from nnrun.spec import LoadedSpec, is_prompt_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Shards per worker when the size is not given: enough to balance uneven shards and
# to lose little to a failure, few enough that each shard amortises its start.
SHARDS_PER_WORKER = 4


@dataclass(frozen=True)
class Shard:
    """One piece of a run: sweep points, or prompts [start, stop) of a prompt file."""

    index: int
    points: tuple[int, ...] | None = None  # None: the run has no sweep
    window: tuple[int, int] | None = None  # None: not a window of a prompt file

    @property
    def label(self) -> str:
        if self.window is not None:
            return f"shard {self.index} (prompts {self.window[0]}..{self.window[1] - 1})"
        if self.points is not None:
            first, last = self.points[0], self.points[-1]
            span = f"point {first}" if len(self.points) == 1 else f"points {first}..{last}"
            return f"shard {self.index} ({span})"
        return f"shard {self.index} (the whole run)"

    def file(self, directory: Path) -> Path:
        return directory / f"shard-{self.index:05d}.h5"

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "points": None if self.points is None else list(self.points),
            "window": None if self.window is None else list(self.window),
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Shard:
        points, window = data.get("points"), data.get("window")
        return Shard(
            int(data["index"]),
            None if points is None else tuple(int(p) for p in points),
            None if window is None else (int(window[0]), int(window[1])),
        )


def shard_dir(output: Path) -> Path:
    """Where a distributed run keeps its shard files: `runs/x.h5` -> `runs/x.shards/`."""
    return output.with_name(output.stem + ".shards")


def plan_shards(loaded: LoadedSpec, *, workers: int, size: int | None = None) -> list[Shard]:
    """Split a run into shards; `size` is points (sweeps) or prompts (files) per shard.

    Without a size, a sweep gets about SHARDS_PER_WORKER shards per worker. A prompt
    file's windows are whole batches (a multiple of batch_size), so each shard runs
    exactly the batches a local run would: the same padding, the same numbers.
    """
    if size is not None and size < 1:
        raise NnrunError(f"the shard size must be at least 1, not {size}")
    target = max(1, workers) * SHARDS_PER_WORKER
    points = loaded.points()
    first = points[0].data
    if loaded.sweep is not None:
        per = size or max(1, math.ceil(len(points) / target))
        return [
            Shard(i, tuple(p.index for p in points[start : start + per]))
            for i, start in enumerate(range(0, len(points), per))
        ]
    if is_prompt_file(first.get("prompts")):
        total = count_file_prompts(first["prompts"])
        batch = max(1, int(first.get("batch_size", 8)))
        per = size or math.ceil(max(1, total) / target)
        per = max(batch, math.ceil(per / batch) * batch)
        windows = [(a, min(total, a + per)) for a in range(0, total, per)] or [(0, 0)]
        return [Shard(i, window=w) for i, w in enumerate(windows)]
    return [Shard(0)]


def count_file_prompts(prompts: dict[str, Any]) -> int:
    """How many prompts a `prompts: {file: ...}` section gives (its limit applied)."""
    from nnrun.compile.plan import PromptSource
    from nnrun.engine import count_prompts

    path = Path(str(prompts["file"]))
    if not path.is_file():
        raise NnrunError(f"prompts.file: no such file '{path}'")
    return count_prompts(PromptSource(file=str(path), limit=prompts.get("limit")))


# -- the manifest: what a resumed run must agree with ---------------------------------------


def spec_sha256(loaded: LoadedSpec) -> str:
    return hashlib.sha256(loaded.text.encode()).hexdigest()


def write_manifest(directory: Path, loaded: LoadedSpec, shards: list[Shard]) -> None:
    """Record the spec and the shards in the shard directory (written atomically)."""
    data = {
        "format": MANIFEST_FORMAT,
        "spec": loaded.text,
        "spec_sha256": spec_sha256(loaded),
        "shards": [s.as_json() for s in shards],
    }
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of an earlier run (None when there is none)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NnrunError(f"cannot resume: {path} is damaged ({e}); remove {directory}") from None
    if data.get("format") != MANIFEST_FORMAT:
        raise NnrunError(f"cannot resume: {path} was written by another nnrun version")
    return data


def clear_shards(directory: Path) -> None:
    """Remove a shard directory's own files (never anything else), then the directory."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if path.name == MANIFEST or (path.name.startswith("shard-") and path.suffix == ".h5"):
            path.unlink()
    try:
        directory.rmdir()
    except OSError:
        pass  # something else lives there: leave it


def finished(path: Path, loaded: LoadedSpec) -> bool:
    """Whether a shard file is complete and was written for this spec."""
    import h5py

    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            spec = f.attrs.get("spec", "")
            spec = spec.decode() if isinstance(spec, bytes) else str(spec)
            return f.attrs.get("status") == "complete" and spec == loaded.text
    except OSError:
        return False  # an unreadable file is run again


# -- running one shard (on a worker) ---------------------------------------------------------


@dataclass
class ShardReport:
    """What a worker says about a shard it ran (or could not run)."""

    index: int
    ok: bool
    error: str = ""
    points_done: int = 0
    points_failed: int = 0
    failures: dict[int, str] = field(default_factory=dict)
    rows: int = 0
    load_s: float = 0.0  # loading the model (0 when the worker had it already)
    run_s: float = 0.0  # the whole shard: load, compile, forward passes, write
    worker: str = ""  # host:pid


def run_shard(
    loaded: LoadedSpec, shard: Shard, path: Path, log: Callable[[str], None] | None = None
) -> ShardReport:
    """Run one shard into `path` through the local loop; the model stays cached after."""
    from nnrun._run import SweepRunner, write_output

    start = time.perf_counter()
    everything = {p.index for p in loaded.points()}
    others = everything - set(shard.points) if shard.points is not None else set()
    runner = SweepRunner(loaded, done=others, log=log, cache=True, window=shard.window)
    loading = time.perf_counter()
    runner.first_model()
    load_s = time.perf_counter() - loading
    write_output(loaded, path, runner, attrs={"shard": json.dumps(shard.as_json())})
    state = runner.state
    failed = {i: m for i, m in state.failures.items() if i not in others}
    return ShardReport(
        index=shard.index,
        ok=True,
        points_done=state.points_done - len(others),
        points_failed=len(failed),
        failures=failed,
        rows=state.rows_done,
        load_s=load_s,
        run_s=time.perf_counter() - start,
    )


class ShardWorker:
    """A worker process that keeps one model loaded and runs shard after shard.

    Ray makes it an actor (`ray.remote(ShardWorker)`); it never raises out of `run`,
    so an exception that reaches the driver means the worker itself died.
    """

    def __init__(self, cwd: str, threads: int) -> None:
        # Relative paths in the spec (model, prompt file, operands) are the driver's.
        if os.path.isdir(cwd):
            os.chdir(cwd)
        import torch

        import nnrun._run  # noqa: F401  (the imports are part of starting, not of a shard)
        import nnrun.models  # noqa: F401

        torch.set_num_threads(max(1, threads))
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def ready(self) -> str:
        """Answers once the worker has started (its imports done): `host:pid`."""
        return self.name

    def run(self, loaded: LoadedSpec, shard: Shard, path: str) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            report = run_shard(loaded, shard, Path(path))
        except Exception as e:  # a shard failure, reported to the driver
            text = str(e).splitlines()[0] if str(e) else ""
            message = text if isinstance(e, NnrunError) else f"{type(e).__name__}: {text}"
            report = ShardReport(shard.index, ok=False, error=message)
            report.run_s = time.perf_counter() - start
        report.worker = self.name
        return asdict(report)


def report_from(data: dict[str, Any]) -> ShardReport:
    """A ShardReport back from the plain dict a worker returned."""
    data = dict(data)
    data["failures"] = {int(k): v for k, v in (data.get("failures") or {}).items()}
    return replace(ShardReport(index=int(data.pop("index")), ok=bool(data.pop("ok"))), **data)
