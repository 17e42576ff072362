"""Running a spec end to end: groups of sweep points -> compile -> engine -> store.

This is the loop behind `nnrun.run` and `nnrun run`. It loads each model once
(and keeps it in a small cache for the process), compiles every point, packs the
points of a group into shared batch rows, and writes each batch as it finishes.
A sweep point that fails (at compile time or in its forward pass) is recorded in
the file with its message while the other points go on; a spec without a sweep
fails as a whole, as a single run should.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nnrun.errors import CompileError, NnrunError, RunError
from nnrun.spec import LoadedSpec, SweepPoint, is_prompt_file
from nnrun.spec._constants import CONFIRM_SWEEP_POINTS


@dataclass
class RunProgress:
    """Where a run stands; passed to the progress callback after every step."""

    stage: str = "loading model"  # loading model | compiling | running | merging | done
    rows_done: int = 0
    rows_total: int | None = None  # None while unknown (prompts streamed from a file)
    points_done: int = 0
    points_total: int = 1
    points_failed: int = 0
    failures: dict[int, str] = field(default_factory=dict)  # point index -> message
    # A distributed run (--executor ray): shards finished (skipped ones included),
    # shards that failed every try, and how many tries were repeated.
    shards_done: int = 0
    shards_total: int = 0
    shards_running: int = 0
    shards_failed: int = 0
    retries: int = 0


ProgressFn = Callable[[RunProgress], None]

# What a bad sweep point raises in its forward pass: nnrun's own checks, or torch's
# (a shape that only fails inside a module). Anything else stops the run.
_POINT_ERRORS = (RunError, CompileError, RuntimeError, ValueError, IndexError)

_MODELS: dict[str, Any] = {}


def cached_model(
    model_spec: dict[str, Any],
    log: Callable[[str], None] | None = None,
    cache: bool = True,
    local: dict[str, Any] | None = None,
) -> Any:
    """The loaded model a `model:` section names.

    With `cache`, models stay loaded for the process (the last one only: a notebook
    looping over models must not pile them up); `local` is a run's own cache, so a
    sweep loads each model once even with `cache=False`.
    """
    from nnrun.models import load_model

    key = json.dumps(model_spec, sort_keys=True, default=str)
    store = _MODELS if cache else local if local is not None else {}
    if key in store:
        return store[key]
    loaded = load_model(model_spec, progress=log)
    if cache:
        _MODELS.clear()
    store[key] = loaded
    return loaded


def clear_cache() -> None:
    """Forget the models `nnrun.run` keeps loaded between calls."""
    _MODELS.clear()


def sweep_layout(spec: LoadedSpec) -> Any:
    """The store's description of the spec's sweep (None without one)."""
    from nnrun.compile import point_sha256
    from nnrun.store import SweepLayout

    sweep = spec.sweep
    if sweep is None:
        return None
    points = spec.points()
    coords = {a.name: a.values for a in sweep.axes}
    return SweepLayout(
        positions=position_variables(spec),
        dims=sweep.dims,
        shape=sweep.shape,
        mode=sweep.mode,
        coords=coords,
        labels=tuple(p.label for p in points),
        hashes=tuple(point_sha256(p.data) for p in points),
    )


def write_output(
    loaded: LoadedSpec,
    path: Path,
    runner: SweepRunner,
    *,
    resume: bool = False,
    attrs: dict[str, Any] | None = None,
    git: Callable[[], tuple[str, bool]] | None = None,
) -> None:
    """Open the output file for `runner` and run every group into it.

    This is a local run (`nnrun.run`) and one shard of a distributed run alike. The
    first group is compiled before the file is opened, so a spec without a sweep that
    does not compile leaves no file. `attrs` are added to the file's root attributes;
    `git` answers the git state asked for before the model loaded (`git_state_later`).
    """
    from functools import partial

    from nnrun.compile import model_device
    from nnrun.engine._batch import iter_prompt_meta
    from nnrun.store import OutputWriter, provenance

    model = runner.first_model()
    first_plan = runner.prepare(0)[0] if runner.groups else None
    first = loaded.points()[0].data
    root = provenance(
        loaded.text,
        int(first.get("seed", 0)),
        model.info.as_attrs(),
        str(model_device(model.model)),
        git,
    )
    root.update(run_attrs(loaded))
    # The attention kernel the run used: a pattern save may switch it to eager.
    loaded_kernel = getattr(getattr(model.model, "config", None), "_attn_implementation", None)
    kernel = (first_plan.attn_implementation if first_plan is not None else None) or loaded_kernel
    if kernel:
        root["attn_implementation"] = str(kernel)
    root.update(attrs or {})
    streamed = is_prompt_file(first["prompts"])
    meta = None
    if streamed and first_plan is not None:
        meta = partial(iter_prompt_meta, first_plan.prompts)  # extra JSONL fields
    with OutputWriter(
        path,
        root,
        sizes=_model_sizes(model.model),
        prompt_ids=None if streamed else tuple(first["prompts"]),
        sweep=sweep_layout(loaded),
        resume=resume,
        prompt_meta=meta,
        expected_rows=runner.state.rows_total if streamed else None,
    ) as out:
        runner.run(out)


def run_attrs(loaded: LoadedSpec) -> dict[str, Any]:
    """What a run records about itself besides provenance: the `-s` overrides, a sha256
    of every input file, and torch's thread count (CPU sums depend on it, so
    `nnrun reproduce` uses the recorded one)."""
    import torch

    from nnrun.store import input_files

    points = [(p.label, p.data) for p in loaded.points()] if loaded.sweep else None
    return {
        "overrides": json.dumps(list(loaded.overridden.values())),
        "inputs": json.dumps(input_files(loaded.data, points)),
        "torch_num_threads": int(torch.get_num_threads()),
    }


def _model_sizes(model: Any) -> dict[str, int]:
    config = getattr(model, "config", None)
    sizes = {}
    for label, key in (("vocab", "vocab_size"), ("hidden", "hidden_size")):
        value = getattr(config, key, None)
        if isinstance(value, int):
            sizes[label] = value
    return sizes


def position_variables(spec: LoadedSpec) -> dict[str, str]:
    """Sweep variables used as token positions -> the prompt whose tokens they count.

    A variable in an edit's, save's or metric's `tokens:`/`token:` counts the tokens of
    the one prompt that entry selects (else of the first prompt).
    """
    from nnrun.spec._substitute import referenced_names

    data = spec.data
    prompts = data.get("prompts")
    first = next(iter(prompts), None) if isinstance(prompts, dict) else None
    entries = [*(data.get("edits") or []), *(data.get("save") or {}).values()]
    entries += list((data.get("metrics") or {}).values())
    found: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        used = referenced_names([entry.get("tokens"), entry.get("token")]) & spec.deferred
        selected = entry.get("prompts")
        prompt = selected[0] if isinstance(selected, list) and len(selected) == 1 else first
        for name in used:
            if prompt is not None:
                found.setdefault(name, str(prompt))
    return found


def check_size(spec: LoadedSpec, yes: bool) -> None:
    """Refuse a very large sweep unless the user confirmed it."""
    points = len(spec.points())
    if points <= CONFIRM_SWEEP_POINTS or yes:
        return
    prompts = spec.points()[0].data.get("prompts")
    per_point = len(prompts) if isinstance(prompts, dict) and not is_prompt_file(prompts) else None
    rows = f" and up to {points * per_point:,} batch rows" if per_point else ""
    raise NnrunError(
        f"the sweep has {points:,} points{rows}; that is more than {CONFIRM_SWEEP_POINTS:,}, "
        "so it runs only when confirmed: add --yes (nnrun.run(..., yes=True))"
    )


def done_points(spec: LoadedSpec, output: Path) -> set[int]:
    """The points a partial sweep file already holds; refuses a file from another spec.

    The spec must be the one that wrote the file (its resolved text, which includes
    the sweep), and each done point's hash must match: otherwise the message says
    which keys changed.
    """
    from nnrun.compile import point_sha256
    from nnrun.store import partial_path, read_partial

    if spec.sweep is None:
        raise NnrunError("--resume continues a sweep, and this spec has no sweep: section")
    state = read_partial(output)
    if state is None:
        raise NnrunError(
            f"nothing to resume: {partial_path(output)} does not exist (run without --resume)"
        )
    if state["spec"] != spec.text:
        raise NnrunError(
            f"cannot resume {output}: the spec changed since the partial file was written "
            f"({_spec_difference(state['spec'], spec.text)}); run without --resume to start over"
        )
    points = spec.points()
    done = {i for i, status in enumerate(state["status"]) if status == 1}
    for i in done:
        if i >= len(points) or state["hashes"][i] != point_sha256(points[i].data):
            raise NnrunError(
                f"cannot resume {output}: point {i} was written by a different spec; "
                "run without --resume to start over"
            )
    return done


def _spec_difference(before: str, after: str) -> str:
    import yaml

    old, new = yaml.safe_load(before) or {}, yaml.safe_load(after) or {}
    changed = _changed_paths(old, new, "")
    shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
    return f"changed: {shown}" if changed else "the text differs"


def _changed_paths(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            child = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                out.append(child)
            else:
                out += _changed_paths(old[key], new[key], child)
        return out
    return [] if old == new else [path or "(the whole spec)"]


class SweepRunner:
    """Runs the points of a spec, group by group, into an output file.

    The first group is compiled (`prepare`) before the output file is opened, so a
    spec without a sweep that does not compile leaves no file behind.
    """

    def __init__(
        self,
        spec: LoadedSpec,
        *,
        done: set[int] | None = None,
        progress: ProgressFn | None = None,
        log: Callable[[str], None] | None = None,
        cache: bool = True,
        window: tuple[int, int] | None = None,
    ) -> None:
        from nnrun.compile import group_points

        self.spec = spec
        # Prompts [start, stop) of a prompt file: one shard of a distributed run.
        self.window = window
        self.report = progress or (lambda _state: None)
        self.log = log
        self.cache = cache
        self.isolate = spec.sweep is not None
        self.models: dict[str, Any] = {}
        points = spec.points()
        done = done or set()
        todo = [p for p in points if p.index not in done]
        self.groups = group_points(todo)
        self.state = RunProgress(points_total=len(points), points_done=len(done))
        self.state.rows_total = self._rows_estimate(todo)
        self._prepared: dict[int, tuple[Any, Any]] = {}
        self.out: Any = None  # a BackgroundWriter over the open OutputWriter

    def first_model(self) -> Any:
        """The model of the first group to run (loaded once; the sweep reuses it)."""
        spec = self.groups[0].model if self.groups else self.spec.points()[0].data["model"]
        return self._model(spec)

    def prepare(self, index: int = 0) -> tuple[Any, Any]:
        """Compile a group's points and pack them: (plan or None, model). Failures are kept."""
        if index not in self._prepared:
            group = self.groups[index]
            model = self._model(group.model)
            self._prepared[index] = (self._compile(group.points, model), model)
        return self._prepared[index]

    def run(self, out: Any) -> RunProgress:
        """Run every group into the open output file `out`.

        The file is written on a thread of its own (`BackgroundWriter`): batch N is
        written while batch N+1 computes. Whatever way the run ends, the writer has
        made every call handed to it before `out` is closed.
        """
        from nnrun.store import BackgroundWriter

        self.out = writer = BackgroundWriter(out)
        try:
            if self.state.failures:  # found while preparing, before the file was open
                writer.mark_points([], dict(self.state.failures))
            for index in range(len(self.groups)):
                plan, model = self.prepare(index)
                self._prepared.pop(index, None)
                if plan is not None:
                    self._execute_plan(plan, model)
            writer.drain()
        finally:
            writer.close()
        self.state.stage = "done"
        self.report(self.state)
        return self.state

    def _model(self, model_spec: dict[str, Any]) -> Any:
        self.state.stage = "loading model"
        self.report(self.state)
        return cached_model(model_spec, self.log, self.cache, self.models)

    def _rows_estimate(self, points: list[SweepPoint]) -> int | None:
        prompts = points[0].data.get("prompts") if points else {}
        if isinstance(prompts, dict) and not is_prompt_file(prompts):
            return len(points) * len(prompts)
        return None

    def _fail(self, point: SweepPoint, error: Exception) -> None:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        self.state.points_failed += 1
        self.state.failures[point.index] = message
        if self.out is not None:
            self.out.mark_points([], {point.index: message})

    def _compile(self, points: tuple[SweepPoint, ...], model: Any) -> Any:
        from nnrun.compile import compile_point, pack_points
        from nnrun.engine import count_prompts, preflight

        self.state.stage = "compiling"
        self.report(self.state)
        compiled = []
        for point in points:
            try:
                plan = compile_point(point.data, model.model, model.tokenizer)
                preflight(plan, model.model, model.tokenizer)
            except (CompileError, RunError) as e:
                if not self.isolate:
                    raise
                self._fail(point, e)
                continue
            compiled.append((point, plan))
        if not compiled:
            return None
        plan = pack_points(compiled, spec_text=self.spec.text)
        if self.window is not None and plan.rows is None:
            start, stop = self.window
            prompts = replace(plan.prompts, skip=plan.prompts.skip + start, limit=stop - start)
            plan = replace(plan, prompts=prompts)
        if plan.rows is None:
            # Read the whole prompt file once now: a bad line is reported before any
            # output file exists, and the count gives the progress bar its total.
            self.state.rows_total = (self.state.rows_total or 0) + count_prompts(plan.prompts)
        return plan

    def _execute_plan(self, plan: Any, model: Any) -> None:
        from nnrun.engine import Engine

        self.out.register(plan)
        engine = Engine(plan, model.model, model.tokenizer)
        engine.wait_for_host = False  # the writer thread waits for each batch's copies
        self.state.stage = "running"
        self.report(self.state)
        self._execute(engine, plan)

    def _execute(self, engine: Any, plan: Any) -> None:
        """Run every row; on a failing batch, run its points one by one to find the culprit."""
        if plan.rows is None:  # streamed prompts: one point, rows unknown in advance
            self._stream(engine, plan)
            return
        points = {p.index: p for p in self.spec.points()}
        waiting = {info.index: {row for _, row in info.rows} for info in plan.points}
        pending = [row.key for row in plan.rows]
        while pending:
            try:
                for result in engine.run(rows=pending):
                    self._record(result, waiting)
                pending = []
            except _POINT_ERRORS:
                failing = set(engine.current_rows)
                suspects = [i for i, rows in waiting.items() if rows & failing]
                if not self.isolate or not suspects:
                    raise
                for index in suspects:
                    rows = [r.key for r in plan.rows if r.key in waiting[index]]
                    try:
                        for result in engine.run(rows=rows):
                            self._record(result, waiting)
                    except _POINT_ERRORS as alone:
                        waiting.pop(index, None)
                        self._fail(points[index], alone)
                        self.report(self.state)
                needed = set().union(*waiting.values()) if waiting else set()
                pending = [k for k in pending if k in needed]

    def _record(self, result: Any, waiting: dict[int, set[str]]) -> None:
        """Write a batch, then mark the points it completed (never before their data)."""
        self.out.write(result)
        self._written(result.rows, waiting)
        self.state.rows_done += len(result.rows)
        self.report(self.state)

    def _written(self, rows: list[str], waiting: dict[int, set[str]]) -> None:
        """Mark points whose rows are all written as done."""
        done = []
        for index, remaining in list(waiting.items()):
            remaining.difference_update(rows)
            if not remaining:
                done.append(index)
                del waiting[index]
        if done:
            self.out.mark_points(done)
            self.state.points_done += len(done)

    def _stream(self, engine: Any, plan: Any) -> None:
        (info,) = plan.points
        point = next(p for p in self.spec.points() if p.index == info.index)
        try:
            for result in engine.run():
                self.out.write(result)
                self.state.rows_done += len(result.prompt_ids)
                self.report(self.state)
        except _POINT_ERRORS as e:
            if not self.isolate:
                raise
            self._fail(point, e)
            return
        self.out.mark_points([info.index])
        self.state.points_done += 1
