"""The Python API: the same functions the CLI verbs call.

>>> import nnrun
>>> results = nnrun.run("examples/demo.yaml", overrides=["batch_size=1"])   # doctest: +SKIP
>>> results["resid"].shape                                                  # doctest: +SKIP
torch.Size([2, 30, 1, 576])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnrun._run import ProgressFn, RunProgress, clear_cache
from nnrun.errors import NnrunError
from nnrun.spec import LoadedSpec, check_spec
from nnrun.store import Results, describe_saves, load, top_next_tokens

__all__ = [
    "ProgressFn",
    "RunProgress",
    "clear_cache",
    "describe_saves",
    "top_next_tokens",
]  # re-exported for nnrun.__init__


def run(
    spec: str | Path | dict[str, Any] | LoadedSpec,
    overrides: Sequence[str] = (),
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
    resume: bool = False,
    yes: bool = False,
    cache: bool = True,
    executor: str = "local",
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0,
    shard_size: int | None = None,
    retries: int = 2,
) -> Results:
    """Validate, compile and execute a spec; write its output file; return its results.

    `spec` is a path to a YAML/JSON file, a dict, or an already loaded spec.
    `overrides` are `key.path=value` strings, as `nnrun run -s` takes them.
    A spec with `sweep:` runs every point into one file (`Results.failed_points()`
    lists the points that failed; the others are complete); `resume=True` continues
    an interrupted sweep from its partial file. Sweeps over more than 10,000 points
    need `yes=True`. Loaded models stay cached between calls (`cache=False` to
    load afresh; `nnrun.clear_cache()` to free them).

    `output` replaces the spec's output file (ending in "/": that directory, with
    the spec's file name); an existing output is replaced only with `overwrite`.
    The output path is checked and locked before the model loads; SIGINT and
    SIGTERM raise `nnrun.Interrupted` and leave at most a file marked partial.

    `executor="ray"` splits the work into shards (groups of sweep points, or windows
    of a prompt file) and runs them on a Ray cluster (`address`, default: a local one)
    with `workers` workers that each load the model once (`gpus_per_worker` GPUs
    each); a shard that fails is tried `retries` more times. The merged file is the
    one a local run writes (see docs/scaling.md). Needs `pip install nnrun[ray]`.

    >>> results = nnrun.run("specs/activation-patching.yaml")        # doctest: +SKIP
    >>> results.metric("logit_diff").shape, results.coords("logit_diff")  # doctest: +SKIP
    """
    from nnrun._run import SweepRunner, check_size, done_points, write_output
    from nnrun.spec import with_output
    from nnrun.store import claim_output, output_path
    from nnrun.store._provenance import git_state_later

    loaded = spec if isinstance(spec, LoadedSpec) else check_spec(spec, overrides)
    check_size(loaded, yes)
    # The stored spec must be the one that ran: -o goes into it.
    data = loaded.data
    target = output_path(
        output if output is not None else data["output"], data["output"], data["name"]
    )
    loaded = with_output(loaded, str(target))
    if executor not in ("local", "ray"):
        raise NnrunError(f"unknown executor {executor!r}; use local or ray")
    with claim_output(target, overwrite=overwrite):
        if executor == "ray":
            from nnrun.executor import RayOptions, run_ray

            options = RayOptions(
                address=address,
                workers=workers,
                gpus_per_worker=gpus_per_worker,
                shard_size=shard_size,
                retries=retries,
            )
            run_ray(loaded, target, options, progress=progress, log=log, resume=resume)
            return load(target)
        git = git_state_later()  # answered while the model loads
        runner = SweepRunner(
            loaded,
            done=done_points(loaded, target) if resume else None,
            progress=progress,
            log=log,
            cache=cache,
        )
        write_output(loaded, target, runner, resume=resume, git=git)
    return load(target)


@dataclass
class GroupReport:
    """One group of sweep points that share forward passes."""

    points: int  # points compiled into the group's plan
    rows: int | None  # batch rows (None: prompts stream from a file)
    batches: int | None
    reason: str  # why the group is separate from the first ("" for the first)
    failed: dict[str, str]  # point label -> compile error


@dataclass
class PlanReport:
    """A compiled plan plus what `nnrun plan` shows about it.

    For a sweep, `plan` is the first group's packed plan and `groups` describes
    every group; shapes and bytes cover the whole output file.
    """

    plan: Any  # nnrun.compile.Plan
    prompt_count: int
    batches: int
    # Per save: the shape a reader gets back (the padded view) and the bytes the file
    # stores (packed saves: real tokens only); see nnrun._estimate.
    save_shapes: dict[str, tuple[int, ...]]
    save_bytes: dict[str, int]
    model_name: str
    groups: list[GroupReport] = field(default_factory=list)
    metric_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    points: int = 1
    # With backward: activation bytes one batch keeps for its backward pass (measured on
    # probe passes), for batch_size rows of `longest` tokens; freed after every batch.
    backward_bytes: int | None = None
    longest: int = 1  # tokens in the longest prompt (1 when unknown)
    backward_rows: int = 0  # the batch rows backward_bytes is for
    save_layouts: dict[str, str] = field(default_factory=dict)  # packed | padded
    # False: the estimate is an upper bound (prompt files; generation may stop early).
    save_exact: dict[str, bool] = field(default_factory=dict)
    passes: int = 1  # forward passes per batch (generation: one per new token)


def plan(
    spec: str | Path | dict[str, Any] | LoadedSpec,
    overrides: Sequence[str] = (),
    *,
    log: Callable[[str], None] | None = None,
) -> PlanReport:
    """Compile a spec against its model and estimate the output; no prompt is run.

    The model is loaded (its module tree and a two-token probe pass fix the
    execution order and each site's shape), but none of the spec's prompts
    go through it. A sweep is compiled point by point and packed, group by group,
    exactly as `run` would; points that do not compile are listed, not raised.
    """
    import math

    from nnrun._estimate import estimate_saves
    from nnrun._run import SweepRunner

    loaded = spec if isinstance(spec, LoadedSpec) else check_spec(spec, overrides)
    runner = SweepRunner(loaded, progress=None, log=log)
    model = runner.first_model()
    groups: list[GroupReport] = []
    compiled = None
    packed_plans = []
    labels = {p.index: p.label for p in loaded.points()}
    for index, group in enumerate(runner.groups):
        before = dict(runner.state.failures)
        packed, _ = runner.prepare(index)
        packed_plans.append(packed)
        compiled = compiled or packed
        failed = {labels[i]: m for i, m in runner.state.failures.items() if i not in before}
        rows = None if packed is None or packed.rows is None else len(packed.rows)
        batch_size = int(group.points[0].data.get("batch_size", 8))
        groups.append(
            GroupReport(
                points=0 if packed is None else len(packed.points),
                rows=rows,
                batches=None if rows is None else math.ceil(rows / batch_size),
                reason=group.reason,
                failed=failed,
            )
        )
    if compiled is None:
        raise NnrunError(
            "no point of the sweep compiles: "
            + "; ".join(f"{k}: {v}" for g in groups for k, v in list(g.failed.items())[:3])
        )
    lead = loaded.sweep.shape if loaded.sweep is not None else ()
    estimates, count = estimate_saves([p for p in packed_plans if p is not None], model, lead)
    backward_bytes = None
    longest = 1
    rows_per_batch = compiled.batch_size
    if compiled.rows is not None:
        rows_per_batch = min(rows_per_batch, len(compiled.rows))
    if compiled.backward is not None:  # the memory estimate needs the longest prompt
        longest = _longest_prompt(compiled.prompts, model.tokenizer)
        backward_bytes = _backward_memory(compiled, model, rows_per_batch, longest)
    metric_shapes = {
        m.name: (*lead, len(m.prompts) if m.prompts is not None else count)
        for m in compiled.metrics
    }
    return PlanReport(
        plan=compiled,
        prompt_count=count,
        batches=sum(g.batches or 0 for g in groups) or math.ceil(count / compiled.batch_size),
        save_shapes={name: e.shape for name, e in estimates.items()},
        save_bytes={name: e.bytes for name, e in estimates.items()},
        model_name=model.info.name,
        groups=groups,
        metric_shapes=metric_shapes,
        points=len(loaded.points()),
        backward_bytes=backward_bytes,
        longest=longest,
        backward_rows=rows_per_batch,
        save_layouts={name: e.layout for name, e in estimates.items()},
        save_exact={name: e.exact for name, e in estimates.items()},
        passes=int(compiled.generate["max_new_tokens"]) if compiled.generate else compiled.passes,
    )


def _longest_prompt(prompts: Any, tokenizer: Any, most: int = 10_000) -> int:
    """Tokens in the longest of (the first `most`) prompts of a prompt file."""
    from itertools import islice

    from nnrun.engine import iter_prompts

    longest = 1
    for _, text in islice(iter_prompts(prompts, tokenizer), most):
        longest = max(longest, len(tokenizer(text)["input_ids"]))
    return longest


def _backward_memory(compiled: Any, model: Any, rows: int, longest: int) -> int:
    """Activation bytes one batch's backward pass keeps (see compile.backward_bytes)."""
    from nnrun.compile import backward_bytes

    reading = [
        actions.site
        for actions in compiled.sites
        if any(s.kind in ("grad", "attribution") for s in actions.saves)
    ]
    first = min(reading, key=lambda site: site.order)
    return backward_bytes(
        model.model, (first.module, first.port), rows, longest, tokenizer=model.tokenizer
    )


def load_model_for(loaded: LoadedSpec, log: Callable[[str], None] | None = None) -> Any:
    """The model a loaded spec names (see nnrun.models.load_model)."""
    from nnrun.models import load_model

    return load_model(loaded.data["model"], progress=log)


@dataclass
class ModuleRow:
    """One module of `nnrun modules`: its path, class and the shapes it carried."""

    path: str
    cls: str
    depth: int
    output: Any  # Shape
    input: Any
    standard: str = ""  # its standard name (@layers.3.attn), if it has one


@dataclass
class ModuleTree:
    """`nnrun modules`: every module's row, the model's name and class, and what the
    class added with random weights (not in the checkpoint)."""

    rows: list[ModuleRow]
    name: str
    model_class: str
    new_modules: tuple[str, ...]
    standard: dict[str, str]  # @name -> real path, for the names this model has


def module_tree(
    model_spec: dict[str, Any],
    prompt: str = "The capital of France is",
    *,
    log: Callable[[str], None] | None = None,
) -> ModuleTree:
    """Every module of a model with the shapes it carries for a sample prompt.

    Rows are in registration order, each with its standard name where it has one.
    """
    from nnrun.compile import probe_sites
    from nnrun.compile._names import standard_names
    from nnrun.models import load_model

    model = load_model(model_spec, progress=log)
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    sites = probe_sites(model.model, ids)
    names = standard_names(model.model)
    standard = names.labels()
    rows = []
    for name, module in model.model.named_modules():
        out, inp = sites.get((name, "output")), sites.get((name, "input"))
        rows.append(
            ModuleRow(
                path=name,
                cls=type(module).__name__,
                depth=name.count(".") + 1 if name else 0,
                output=None if out is None else out.shape,
                input=None if inp is None else inp.shape,
                standard=standard.get(name, ""),
            )
        )
    return ModuleTree(
        rows, model.info.name, type(model.model).__name__, model.new_modules, names.describe()
    )


def model_spec_for(target: str) -> tuple[dict[str, Any], str]:
    """The `model:` mapping and a sample prompt for `nnrun modules TARGET`.

    TARGET is a spec file (its model and first inline prompt), a model
    directory, a .gguf file, a builtin model name, or a hub id.
    """
    from nnrun.models._builtin import builtin_names

    sample = "The capital of France is"
    path = Path(target)
    if os.path.isfile(path) and path.suffix in (".yaml", ".yml", ".json"):
        loaded = check_spec(path)
        prompts = loaded.data.get("prompts", {})
        if isinstance(prompts, dict) and "file" not in prompts and prompts:
            sample = str(next(iter(prompts.values())))
        return dict(loaded.data["model"]), sample
    if os.path.isdir(path):
        return {"path": str(path)}, sample
    if path.suffix == ".gguf":
        return {"gguf": str(path)}, sample
    if target in builtin_names():
        return {"builtin": target}, sample
    return {"id": target}, sample
