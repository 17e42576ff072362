"""The `nnrun` command line: parse arguments, call nnrun.api, print with rich.

Every verb is a few lines over a library function; errors meant for the user
print as one message (exit 1), usage errors print typer's usage message (exit 2),
and `--debug` (anywhere on the line) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nnrun._complete import complete_output, complete_spec, complete_template
from nnrun.errors import Interrupted, NnrunError

app = typer.Typer(
    # --install-completion / --show-completion: typer's own (bash, zsh, fish, PowerShell).
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Run declarative experiments on neural-network internals (see `nnrun COMMAND --help`).",
)
console = Console()
# soft_wrap: an error stays on one line when stderr is a pipe or a CI log.
err_console = Console(stderr=True, soft_wrap=True)
_debug = False


def _show_version(value: bool) -> None:
    if value:
        from nnrun import __version__

        console.print(f"nnrun {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for errors (anywhere on the line).")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_show_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    # main() takes --debug out of the arguments wherever it stands; this option
    # only documents it (and catches `nnrun --debug` run through typer directly).
    global _debug
    _debug = _debug or debug


SpecArg = Annotated[
    Path,
    typer.Argument(
        help="The spec file (YAML or JSON); - reads it from stdin.", autocompletion=complete_spec
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a spec key: -s generate.max_new_tokens=8"),
]
OutputOption = Annotated[
    str | None,
    typer.Option(
        "--output",
        "-o",
        help="Output file (default: the spec's); ending in / puts the spec's file name there.",
    ),
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing output file.")
]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue an interrupted sweep from its partial file.")
]
YesOption = Annotated[
    bool, typer.Option("--yes", "-y", help="Run a sweep of more than 10,000 points.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
ExecutorOption = Annotated[
    str,
    typer.Option(
        "--executor",
        help="local, or ray: shards on a Ray cluster (pip install 'nnrun[ray]'; docs/scaling.md).",
    ),
]
AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address", help="Ray: the cluster to use (auto, HOST:PORT); default: a local one."
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="Ray: worker processes, each loading the model once (default: one per "
        "--gpus-per-worker GPUs, else one per node).",
        min=1,
    ),
]
GpusOption = Annotated[
    float, typer.Option("--gpus-per-worker", help="Ray: GPUs each worker takes.", min=0)
]
ShardSizeOption = Annotated[
    int | None,
    typer.Option(
        "--shard-size",
        help="Ray: sweep points (or prompts of a prompt file) per shard; default: about "
        "4 shards per worker.",
        min=1,
    ),
]
RetriesOption = Annotated[
    int, typer.Option("--retries", help="Ray: further tries of a failing shard.", min=0)
]


def _spec_source(spec: Path) -> Path | str:
    """The spec argument as load_spec takes it: `-` is the spec text on stdin."""
    return sys.stdin.read() if str(spec) == "-" else spec


@app.command()
def run(
    spec: SpecArg,
    set_: SetOption = None,
    output: OutputOption = None,
    overwrite: OverwriteOption = False,
    resume: ResumeOption = False,
    yes: YesOption = False,
    quiet: QuietOption = False,
    executor: ExecutorOption = "local",
    address: AddressOption = None,
    workers: WorkersOption = None,
    gpus_per_worker: GpusOption = 0,
    shard_size: ShardSizeOption = None,
    retries: RetriesOption = 2,
) -> None:
    """Run an experiment (every point of its sweep, if it has one) and write its HDF5 file."""
    from nnrun import api

    if executor not in ("local", "ray"):
        raise NnrunError(f"--executor {executor!r}: use local or ray")
    ray_only = {"--address": address, "--workers": workers, "--shard-size": shard_size}
    given = [k for k, v in ray_only.items() if v is not None] + (
        ["--gpus-per-worker"] if gpus_per_worker else []
    )
    if executor == "local" and given:
        raise NnrunError(f"{', '.join(given)} only apply with --executor ray")
    try:
        with _progress_bar(quiet) as (progress, log):
            results = api.run(
                _spec_source(spec),
                set_ or (),
                output=output,
                overwrite=overwrite,
                progress=progress,
                log=log,
                resume=resume,
                yes=yes,
                executor=executor,
                address=address,
                workers=workers,
                gpus_per_worker=gpus_per_worker,
                shard_size=shard_size,
                retries=retries,
            )
    except Interrupted as e:
        # One line: what stopped the run and what it left where (130 for Ctrl-C, 143 for TERM).
        err_console.print(f"[red]{escape(str(e))}[/red]", highlight=False)
        raise typer.Exit(e.exit_code) from None
    _print_summary(results, decode=True)
    failed = results.failed_points()
    if failed:
        err_console.print(
            f"[red]{len(failed)} of {len(results.points())} sweep points failed[/red] "
            f"(listed in {results.path}; `nnrun show` prints them)",
            highlight=False,
        )
        raise typer.Exit(1)


@app.command()
def sweep(
    spec: SpecArg,
    set_: SetOption = None,
    output: OutputOption = None,
    overwrite: OverwriteOption = False,
    resume: ResumeOption = False,
    yes: YesOption = False,
    quiet: QuietOption = False,
    executor: ExecutorOption = "local",
    address: AddressOption = None,
    workers: WorkersOption = None,
    gpus_per_worker: GpusOption = 0,
    shard_size: ShardSizeOption = None,
    retries: RetriesOption = 2,
) -> None:
    """Run a sweep: the same as `nnrun run` (which runs sweeps too)."""
    run(
        spec,
        set_,
        output,
        overwrite,
        resume,
        yes,
        quiet,
        executor,
        address,
        workers,
        gpus_per_worker,
        shard_size,
        retries,
    )


@contextmanager
def _progress_bar(quiet: bool) -> Iterator[tuple[Any, Any]]:
    """A rich progress bar on stderr over a run's rows (and sweep points), or nothing."""
    if quiet:
        yield None, None
        return
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        # Rows done of rows in all, once rows run (not "0/?" while the model loads).
        TextColumn("{task.fields[count]}"),
        TextColumn("{task.fields[points]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("loading model ...", total=None, points="", count="")

        def progress(state: Any) -> None:
            bar.update(task, **progress_fields(state))

        def log(message: str) -> None:
            bar.console.print(f"[dim]{message}[/dim]")

        yield progress, log


def progress_fields(state: Any) -> dict[str, Any]:
    """What the progress bar shows for a RunProgress: no row count while the model loads
    or the spec compiles ("loading model ...", not "0/?"), then rows done of rows in all."""
    points = ""
    if state.points_total > 1:
        points = f"points {state.points_done}/{state.points_total}"
        if state.points_failed:
            points += f" ({state.points_failed} failed)"
    unit, done, total = "rows", state.rows_done, state.rows_total
    if state.shards_total:  # a distributed run counts shards, not rows
        if state.retries:
            points += f" ({state.retries} retried)"
        unit, done, total = "shards", state.shards_done, state.shards_total
    counting = state.stage == "running" or done > 0
    count = ""
    if counting:
        count = f"{done}/{'?' if total is None else total}"
    return {
        "completed": done,
        "total": total if counting else None,
        "description": unit if state.stage == "running" else f"{state.stage} ...",
        "points": points,
        "count": count,
    }


@app.command()
def validate(
    specs: Annotated[
        list[Path],
        typer.Argument(
            help="Spec files to check (- reads one from stdin).", autocompletion=complete_spec
        ),
    ],
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override a spec key (key.path=value).")
    ] = None,
) -> None:
    """Check specs against the schema and the semantic rules; report every error."""
    from nnrun.spec import format_issue, load_spec, validate_spec

    failed = 0
    for path in specs:
        warnings = []
        try:
            loaded = load_spec(_spec_source(path), set_ or ())
            issues = validate_spec(loaded)
            warnings = loaded.warnings
        except NnrunError as e:
            issues = getattr(e, "issues", None) or [str(e)]
        for warning in warnings:
            err_console.print(f"[yellow]warning[/yellow] {format_issue(warning)}", highlight=False)
        if not issues:
            console.print(f"[green]ok[/green] {path}")
            continue
        failed += 1
        for issue in issues:
            text = issue if isinstance(issue, str) else format_issue(issue)
            err_console.print(f"[red]error[/red] {text}", highlight=False, markup=True)
        err_console.print(f"{path}: {len(issues)} error{'s' if len(issues) != 1 else ''}")
    raise typer.Exit(1 if failed else 0)


@app.command()
def schema(
    write: Annotated[
        Path | None,
        typer.Option(
            "--write",
            help="Write a copy into this folder (for editors: see the README) instead of printing it.",
        ),
    ] = None,
) -> None:
    """Print the JSON Schema of the spec format (or write a copy with --write DIR)."""
    from nnrun.spec import schema_path

    if write is None:
        sys.stdout.write(schema_path().read_text())
        return
    if write.exists() and not write.is_dir():
        raise NnrunError(f"--write takes a folder; {write} is a file")
    write.mkdir(parents=True, exist_ok=True)
    target = write / schema_path().name
    target.write_text(schema_path().read_text())
    console.print(
        f"wrote {target}; start a spec with the line\n"
        f"# yaml-language-server: $schema={target.name}  (a path relative to the spec)",
        highlight=False,
    )


@app.command()
def plan(
    spec: SpecArg,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override a spec key (key.path=value).")
    ] = None,
) -> None:
    """Show the compiled plan: sites in execution order, actions, batches, output size."""
    from nnrun import api
    from nnrun.compile import describe_plan

    report = api.plan(_spec_source(spec), set_ or (), log=_log)
    compiled = report.plan
    rows = describe_plan(compiled)
    table = Table(title=f"plan for {spec} on {report.model_name}")
    for column in ("#", "site", "action", "prompts", "tokens", "steps"):
        table.add_column(column, no_wrap=column in ("#", "site"), overflow="fold")
    for row in rows[:_MAX_PLAN_ROWS]:
        cells = (str(row.order), row.site, row.action, row.prompts, row.tokens, row.steps)
        table.add_row(*(escape(c) for c in cells))  # "[layer 0]" is text, not markup
    console.print(table)
    if len(rows) > _MAX_PLAN_ROWS:
        console.print(f"[dim]... and {len(rows) - _MAX_PLAN_ROWS} more actions[/dim]")
    layout = Table(title="output", show_header=True)
    for column in ("dataset", "estimated shape", "layout", "estimated bytes"):
        layout.add_column(column)
    bound = False
    for name, shape in report.save_shapes.items():
        exact = report.save_exact.get(name, True)
        bound = bound or not exact
        size = f"{'' if exact else '<= '}{report.save_bytes[name]:,}"
        layout.add_row(f"saves/{name}", str(shape), report.save_layouts.get(name, ""), size)
    for name, shape in report.metric_shapes.items():
        layout.add_row(f"metrics/{name}", str(shape), "", "")
    console.print(layout)
    if bound:
        console.print(
            "[dim]<= : an upper bound (prompts read from a file now, or generation, where a "
            "prompt may stop early); shapes are the padded view a reader gets back[/dim]"
        )
    if report.points > 1:
        groups = Table(title=f"sweep: {report.points} points in {len(report.groups)} group(s)")
        for column in ("group", "points", "batch rows", "passes", "why separate"):
            groups.add_column(column)
        for i, group in enumerate(report.groups):
            rows_text = "file" if group.rows is None else str(group.rows)
            passes = "per file batch" if group.batches is None else str(group.batches)
            groups.add_row(str(i), str(group.points), rows_text, passes, escape(group.reason))
        console.print(groups)
        for group in report.groups:
            for label, error in group.failed.items():
                console.print(f"[yellow]point {escape(label)} fails:[/yellow] {escape(error)}")
        shared = (
            "with backward: each point has rows of its own, so that its gradients are its own"
            if compiled.backward is not None
            else "rows that do not depend on a sweep variable are shared by every point"
        )
        console.print(f"[dim]{shared}; a batch also carries the source rows its edits read[/dim]")
    else:
        sources = (
            f", plus source rows {', '.join(compiled.source_prompts)} in every batch"
            if compiled.source_prompts
            else ""
        )
        console.print(
            f"{report.prompt_count} prompts in {report.batches} batch(es) of up to "
            f"{compiled.batch_size}{sources}; {_passes(report.passes, compiled.generate)}; "
            f"about {sum(report.save_bytes.values()):,} bytes to {compiled.output}"
        )
    if compiled.backward is not None and report.backward_bytes is not None:
        loss = compiled.backward
        what = f"metric {loss.metric}" if loss.metric is not None else f"the loss at {loss.at}"
        console.print(
            f"backward: one backward pass per batch from {what} ({loss.reduce} over its "
            f"prompts); it keeps about {report.backward_bytes / 2**20:,.1f} MiB of activations "
            f"for a batch of {report.backward_rows} x {report.longest} tokens (measured on probe "
            "passes), freed after each batch",
            highlight=False,
        )
    for warning in compiled.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


_MAX_PLAN_ROWS = 80


def _passes(passes: int, generate: dict | None) -> str:
    if generate:  # the prompt pass makes the first new token, each later pass one more
        return f"{passes} forward pass{'es' if passes != 1 else ''} per batch (generation)"
    return f"{passes} forward pass{'es' if passes != 1 else ''} per batch"


@app.command()
def modules(
    model: Annotated[
        str,
        typer.Argument(
            help="A model dir, a .gguf file, a spec file, or a builtin name.",
            autocompletion=complete_spec,
        ),
    ] = "smollm2-135m-instruct",
    prompt: Annotated[str | None, typer.Option(help="Sample prompt used to find shapes.")] = None,
    depth: Annotated[int | None, typer.Option(help="Show modules down to this depth only.")] = None,
    grep: Annotated[
        str | None,
        typer.Option("--grep", "-g", help="Only modules whose path, class or standard name match."),
    ] = None,
    all_: Annotated[
        bool,
        typer.Option("--all", help="List every repeated layer instead of model.layers.{0..N}."),
    ] = False,
    cls: Annotated[
        str | None,
        typer.Option(
            "--class", help="The transformers Auto class to load with (e.g. AutoModel for BERT)."
        ),
    ] = None,
) -> None:
    """List a model's modules: path, standard name, class, input and output shapes.

    Printed as a table on a terminal and as plain tab-separated lines (one module per
    line, never cut) when piped.
    """
    from nnrun import api
    from nnrun._inspect import collapse_layers, grep_rows

    model_spec, sample = api.model_spec_for(model)
    if cls is not None:
        model_spec["class"] = cls
    tree = api.module_tree(model_spec, prompt or sample, log=_log)
    rows = tree.rows if all_ else collapse_layers(tree.rows)
    if depth is not None:
        rows = [r for r in rows if r.depth <= depth]
    if grep is not None:
        rows = grep_rows(rows, grep)
    title = f"{tree.name} ({tree.model_class}): shapes for {prompt or sample!r}"
    columns = ("path", "standard", "class", "input shape", "output shape")

    def cells(row) -> tuple[str, ...]:
        ran = row.output is not None or row.input is not None
        output = str(row.output) if ran else "(does not run)"
        return (row.path or "(model)", row.standard, row.cls, str(row.input or ""), output)

    if not console.is_terminal:
        print(f"# {title}")
        print("# " + "\t".join(columns))
        for row in rows:
            print("\t".join(cells(row)))
    else:
        table = Table(title=title)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            path, *rest = cells(row)
            indent = "" if grep else "  " * max(0, row.depth - 1)
            table.add_row(escape(indent + path), *(escape(c) for c in rest))
        console.print(table)
        console.print(
            "[dim]write a location as PATH.output or PATH.input; standard names "
            "(@layers.N.output, @ln_final, ...) work on any architecture[/dim]"
        )
    if tree.new_modules:
        err_console.print(
            f"[yellow]note:[/yellow] {tree.model_class} added {', '.join(tree.new_modules)} with "
            "random weights (not in the checkpoint); --class AutoModel loads the model without "
            "them",
            highlight=False,
        )


@app.command()
def show(
    output: Annotated[
        Path, typer.Argument(help="An nnrun output file (.h5).", autocompletion=complete_output)
    ],
    spec: Annotated[
        bool, typer.Option("--spec", help="Print the spec stored in the file.")
    ] = False,
    decode: Annotated[
        bool,
        typer.Option(
            "--decode",
            help="Decode top-k and argmax saves into token strings (loads the run's tokenizer "
            "from local files).",
        ),
    ] = False,
) -> None:
    """Show an output file: provenance, prompts, saves with shapes and axes.

    Reads only the file: the model's tokenizer is loaded only with --decode.
    """
    from nnrun.store import load

    results = load(output)
    table = Table(title=str(output), show_header=False, box=None)
    for key in (
        "status",
        "error",
        "nnrun_version",
        "model_name",
        "model_model_class",
        "device",
        "seed",
        "spec_sha256",
        "git_commit",
        "finished_utc",
    ):
        if key in results.attrs:
            table.add_row(key, escape(str(results.attrs[key])))
    points = results.points()
    if points:
        coords = results.coords()
        table.add_row(
            "sweep", escape(", ".join(f"{k} = {_short_values(v)}" for k, v in coords.items()))
        )
        counts = {s: sum(p["status"] == s for p in points) for s in ("done", "failed", "pending")}
        table.add_row(
            "points", ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" of {len(points)}"
        )
    console.print(table)
    if spec:
        console.print(escape(str(results.attrs.get("spec", "(no spec stored)"))), highlight=False)
    _print_prompts(results)
    _print_summary(results, decode=decode, logits=decode)


@app.command()
def tokens(
    spec: SpecArg,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override a spec key (key.path=value).")
    ] = None,
    limit: Annotated[
        int, typer.Option(help="Show at most this many prompts (a prompt file can be long).")
    ] = 20,
) -> None:
    """Show each prompt's tokens with the positions `tokens:` counts, and what selects them.

    Loads only the tokenizer. Positions count within each prompt's own tokens (-1 is
    the last); the last column names the saves and edits whose `tokens:` pick that
    position in that prompt.
    """
    from nnrun._inspect import prompt_tokens
    from nnrun.models._load import load_tokenizer
    from nnrun.spec import check_spec

    loaded = check_spec(_spec_source(spec), set_ or ())
    tokenizer = load_tokenizer(loaded.data["model"])
    for entry in prompt_tokens(loaded, tokenizer, limit):
        n = len(entry.ids)
        if not console.is_terminal:
            for pos, (tok_id, text) in enumerate(zip(entry.ids, entry.tokens)):
                picked = ",".join(entry.selected.get(pos, []))
                print(f"{entry.prompt}\t{pos}\t{pos - n}\t{tok_id}\t{text!r}\t{picked}")
        else:
            table = Table(title=f"{entry.prompt}: {entry.text!r} ({n} tokens)")
            for column in ("pos", "-pos", "id", "token", "selected by"):
                table.add_column(column, overflow="fold")
            for pos, (tok_id, text) in enumerate(zip(entry.ids, entry.tokens)):
                picked = ", ".join(entry.selected.get(pos, []))
                table.add_row(str(pos), str(pos - n), str(tok_id), escape(repr(text)), picked)
            console.print(table)
        for problem in entry.problems:
            err_console.print(
                f"[red]{escape(entry.prompt)}:[/red] {escape(problem)}", highlight=False
            )


@app.command()
def init(
    name: Annotated[
        str | None,
        typer.Argument(
            help="A template (see the list `nnrun init` prints).", autocompletion=complete_template
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write it (default NAME.yaml).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="A model dir, .gguf file or builtin name: the spec uses it, with its real "
            "module paths.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Start an experiment from a ready-made spec (`nnrun init` lists them).

    `nnrun init logit-lens` writes logit-lens.yaml; `--model DIR` points it at that
    model and writes the model's real module paths for the standard names. Without a
    template, `--model DIR` writes a first spec for that model.
    """
    from nnrun import _templates

    if name is None and model is None:
        table = Table(title="templates (nnrun init NAME [-o FILE] [--model DIR])")
        table.add_column("name")
        table.add_column("what it does", overflow="fold")
        for template in _templates.list_templates():
            table.add_row(template.name, escape(template.description))
        console.print(table)
        return
    model_spec, names = None, None
    if model is not None:
        from nnrun import api
        from nnrun.compile._names import standard_names
        from nnrun.models import load_model

        model_spec, _ = api.model_spec_for(model)
        loaded = load_model(model_spec, progress=_log)
        names = standard_names(loaded.model)
    if name is None:
        target = output or Path("first-experiment.yaml")
        text = _templates.starter(model_spec, names, target)
    else:
        text = _templates.render(name, model_spec, names)
        target = output or Path(f"{_templates.template(name).name}.yaml")
    if target.exists() and not force:
        raise NnrunError(f"{target} exists; choose another name with -o or add --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    console.print(
        f"wrote {target}; next: nnrun validate {target} && nnrun run {target}", highlight=False
    )


@app.command()
def plot(
    output: Annotated[Path, typer.Argument(help="An nnrun output file (.h5).")],
    name: Annotated[str, typer.Argument(help="A metric or save in that file.")],
    figure: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Picture to write (.png, .pdf, .svg)."),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option(help="The prompt to show (default: the first one).")
    ] = None,
    reduce: Annotated[
        str, typer.Option(help="How a save becomes one number: norm, mean, sum, max, min.")
    ] = "norm",
) -> None:
    """Plot a sweep: a line for one sweep variable, a labelled heatmap for two.

    Without a sweep, a save is drawn over its layer / head / token axes (an
    attribution-patching grid: layers by tokens).
    """
    from nnrun import plot as draw

    written = draw(output, name, figure, prompt=prompt, reduce=reduce)
    console.print(f"wrote {written}")


@app.command()
def diff(
    a: Annotated[Path, typer.Argument(help="An output file (.h5), e.g. the published one.")],
    b: Annotated[Path, typer.Argument(help="The output file to compare with it.")],
    rtol: Annotated[
        float, typer.Option(min=0.0, help="Relative tolerance for floating-point values.")
    ] = 0.0,
    atol: Annotated[
        float, typer.Option(min=0.0, help="Absolute tolerance for floating-point values.")
    ] = 0.0,
    only: Annotated[
        list[str] | None,
        typer.Option(help="Compare only this save, group or dataset path (repeatable)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Compare two output files dataset by dataset: exit 0 equal, 1 different, 2 unreadable.

    Floating-point values match when |a - b| <= atol + rtol * |b| (NaN matches NaN);
    token ids, texts and other values must match exactly. Differences in provenance
    (versions, times, device, commit) are listed but never fail.
    """
    import json
    import math

    from nnrun.store import diff as diff_files

    for value, name in ((rtol, "--rtol"), (atol, "--atol")):
        if not math.isfinite(value):
            raise typer.BadParameter(f"{value} is not a finite number", param_hint=name)
    try:
        report = diff_files(a, b, rtol=rtol, atol=atol, only=only or ())
    except NnrunError as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
        raise typer.Exit(report.exit_code)
    _print_diff(report)
    raise typer.Exit(report.exit_code)


@app.command()
def reproduce(
    output: Annotated[Path, typer.Argument(help="An nnrun output file (.h5) to re-run.")],
    set_: SetOption = None,
    rtol: Annotated[
        float | None,
        typer.Option(
            min=0.0, help="Relative tolerance (default: exact on CPU, float noise on GPU)."
        ),
    ] = None,
    atol: Annotated[
        float | None, typer.Option(min=0.0, help="Absolute tolerance (default as for --rtol).")
    ] = None,
    allow_changed_inputs: Annotated[
        bool,
        typer.Option(
            "--allow-changed-inputs",
            help="Go on when a prompt file or {file:} operand differs from the recorded one.",
        ),
    ] = False,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code", help="Allow a stored trust_remote_code: true (runs model code)."
        ),
    ] = False,
    keep: Annotated[
        Path | None, typer.Option(help="Keep the re-run's output file here (default: removed).")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Re-run the spec stored in an output file and diff: exit 0 equal, 1 different, 2 unreadable.

    The stored spec is the one that ran (-o and -s applied). -s changes it again (e.g.
    -s model.path=DIR for CI's copy of the model); the overrides are reported. Inputs
    must match their recorded sha256 unless --allow-changed-inputs.
    """
    from nnrun import reproduce as rerun

    with _progress_bar(quiet) as (progress, log):
        report = rerun(
            output,
            set_ or (),
            rtol=rtol,
            atol=atol,
            allow_changed_inputs=allow_changed_inputs,
            trust_remote_code=trust_remote_code,
            keep=keep,
            progress=progress,
            log=log,
        )
    for note in report.notes:
        err_console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    _print_diff(report.diff)
    verdict = {0: "[green]reproduced[/green]", 1: "[red]differs[/red]"}.get(
        report.exit_code, "[red]unreadable[/red]"
    )
    console.print(
        f"{verdict}: {output} re-run on {report.device} (rtol {report.rtol:g}, "
        f"atol {report.atol:g})"
    )
    raise typer.Exit(report.exit_code)


def _print_diff(report) -> None:
    table = Table(title=f"{report.a} vs {report.b} (rtol {report.rtol:g}, atol {report.atol:g})")
    table.add_column("dataset", no_wrap=True)
    for column in ("shape, dtype", "max abs", "max rel", "worst index: A vs B", "verdict"):
        table.add_column(column, overflow="fold")
    colour = {True: "green", False: "red"}
    for row in report.datasets:
        shape = row.shape if row.shape is not None else row.shape_b
        layout = f"{shape} {row.dtype or row.dtype_b or ''}"
        if row.verdict in ("shape differs", "dtype differs"):
            layout = f"{row.shape} {row.dtype} vs {row.shape_b} {row.dtype_b}"
        worst = "" if row.worst is None else str(row.worst)
        if row.worst is not None and row.a_value is not None:
            worst += f": {row.a_value} vs {row.b_value}"
        verdict = row.verdict + (f" ({row.differing:,} of {row.size:,})" if row.differing else "")
        if row.note:
            verdict += f"; {row.note}"
        table.add_row(
            escape(row.name),
            escape(layout),
            "" if row.max_abs is None else f"{row.max_abs:.3g}",
            "" if row.max_rel is None else f"{row.max_rel:.3g}",
            escape(worst),
            f"[{colour[row.ok]}]{escape(verdict)}[/{colour[row.ok]}]",
        )
    console.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if report.provenance:
        prov = Table(title="provenance differences (never fail)")
        prov.add_column("attribute", no_wrap=True)
        for column in ("A", "B"):
            prov.add_column(column, overflow="fold")
        for d in report.provenance:
            prov.add_row(escape(d.key), *(escape(v) for v in _first_difference(d.a, d.b)))
        console.print(prov)
    failing = sum(not row.ok for row in report.datasets)
    if report.equal:
        console.print(f"[green]equal[/green]: {len(report.datasets)} datasets compared")
    else:
        console.print(f"[red]different[/red]: {failing} of {len(report.datasets)} datasets")


def _first_difference(a: str | None, b: str | None) -> tuple[str, str]:
    """Two attribute values shortened to what differs (the first differing line of a text)."""
    if a is not None and b is not None and ("\n" in a or "\n" in b):
        lines_a, lines_b = a.splitlines(), b.splitlines()
        for i, (x, y) in enumerate(zip(lines_a, lines_b)):
            if x != y:
                return f"line {i + 1}: {_short(x)}", f"line {i + 1}: {_short(y)}"
        return f"{len(lines_a)} lines", f"{len(lines_b)} lines"
    return _short(a), _short(b)


def _short(value: str | None, limit: int = 100) -> str:
    if value is None:
        return "(missing)"
    value = " ".join(value.split())
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _log(message: str) -> None:
    err_console.print(f"[dim]{message}[/dim]")


def _print_prompts(results, limit: int = 10) -> None:
    prompts = results.prompts()
    table = Table(title=f"prompts ({len(prompts)})")
    table.add_column("id")
    table.add_column("text", overflow="fold")
    for prompt, text in list(prompts.items())[:limit]:
        table.add_row(escape(prompt), escape(repr(text)))
    if len(prompts) > limit:
        table.add_row("...", f"{len(prompts) - limit} more")
    console.print(table)


def _print_decoded(results, max_rows: int = 40) -> None:
    """Top-k and argmax saves as token strings (the run's tokenizer, local files only)."""
    from nnrun._inspect import decodable, decode_save, layer_label

    names = decodable(results)
    if not names:
        return
    try:
        tokenizer = results.tokenizer()
    except NnrunError as e:
        err_console.print(f"[yellow]not decoded:[/yellow] {e}", highlight=False)
        return
    for name in names:
        rows = decode_save(results, name, tokenizer, max_rows=max_rows + 1)
        table = Table(title=f"{name} decoded")
        keys = list(rows[0].labels) if rows else []
        for key in keys:
            table.add_column(key)
        table.add_column("tokens")
        for row in rows[:max_rows]:
            labels = [
                layer_label(str(v)) if k == "layer" else str(v) for k, v in row.labels.items()
            ]
            text = "  ".join(repr(t) if v is None else f"{t!r} {v:.3f}" for t, v in row.tokens)
            table.add_row(*(escape(c) for c in labels), escape(text))
        if len(rows) > max_rows:
            table.add_row(
                *(["..."] * len(keys)), "more rows: Results.to_xarray or nnrun show --decode"
            )
        console.print(table)


def _print_summary(results, *, decode: bool = False, logits: bool = True) -> None:
    from nnrun.store import describe_saves, top_next_tokens

    table = Table(title=f"{results.path} ({results.status})")
    for column in ("save", "axes", "shape", "dtype", "bytes"):
        table.add_column(column)
    for name, row in describe_saves(results).items():
        table.add_row(escape(name), row["axes"], row["shape"], row["dtype"], f"{row['bytes']:,}")
    if table.row_count:
        console.print(table)
    _print_metrics(results)
    generated = results.generation()
    if generated:
        gen = Table(title="generated")
        gen.add_column("prompt")
        gen.add_column("text")
        for prompt, text in generated.items():
            gen.add_row(escape(prompt), escape(repr(text)))
        console.print(gen)
    if decode:
        _print_decoded(results)
    if not logits:  # show without --decode reads only the file
        return
    for name, by_prompt in top_next_tokens(results).items():
        top = Table(title=f"top next tokens ({name})")
        top.add_column("prompt")
        top.add_column("top tokens (probability)")
        for prompt, tokens in by_prompt.items():
            top.add_row(escape(prompt), escape("  ".join(f"{t!r} {p:.3f}" for t, p in tokens)))
        console.print(top)


# Sweeps up to this many cells get a heatmap in the terminal; bigger ones only a file.
_MAX_CELLS = 1200


def _print_metrics(results) -> None:
    """Metrics: a table per prompt without a sweep; a heatmap (or line) per metric with one."""
    names = results.metric_names
    if not names:
        return
    coords = results.coords()
    if not coords:
        table = Table(title="metrics")
        table.add_column("prompt")
        for name in names:
            table.add_column(escape(name), justify="right")
        prompts = {p for name in names for p in results.prompt_ids(name)}
        for prompt in (p for p in results.prompts() if p in prompts):
            cells = []
            for name in names:
                ids = results.prompt_ids(name)
                cells.append(
                    _number(results.metric(name)[ids.index(prompt)]) if prompt in ids else ""
                )
            table.add_row(escape(prompt), *cells)
        console.print(table)
        return
    from nnrun.store._grid import sweep_grid

    for name in names:
        if len(coords) > 2:
            console.print(
                f"[dim]{name}: {len(coords)} sweep axes; `nnrun plot` and "
                "`nnrun.load(...).metric(...)` read them[/dim]"
            )
            continue
        for prompt in results.prompt_ids(name)[:2]:
            grid = sweep_grid(results, name, prompt=prompt)
            if grid.values.size > _MAX_CELLS:
                console.print(
                    f"[dim]{name} ({prompt}): {grid.values.size} points; "
                    f"`nnrun plot {results.path} {name}` draws them[/dim]"
                )
                continue
            console.print(_heatmap(grid))
    failed = results.failed_points()
    if failed:
        table = Table(title=f"failed points ({len(failed)})")
        table.add_column("point")
        table.add_column("error")
        for label, error in list(failed.items())[:20]:
            table.add_row(escape(label), escape(error))
        console.print(table)


def _heatmap(grid) -> Table:
    """A rich table whose cells are coloured by value (blue < 0 < red, or dark to bright)."""
    import math

    import numpy as np

    values = np.atleast_2d(grid.values.astype(float))  # (rows, columns)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    signed = low < 0 < high
    bound = max(abs(low), abs(high)) or 1.0

    def style(v: float) -> str:
        if not math.isfinite(v):
            return "dim"
        if signed:
            t = min(1.0, abs(v) / bound)
            shade = int(255 * (1 - t))
            return (
                f"black on rgb(255,{shade},{shade})"
                if v > 0
                else f"black on rgb({shade},{shade},255)"
            )
        t = (v - low) / (high - low) if high > low else 0.0
        level = int(40 + 215 * t)
        return f"black on rgb({level},{level},{int(255 - 0.6 * level)})"

    y_name = grid.y.name if grid.y is not None else ""
    table = Table(title=f"{grid.title} ({grid.prompt})", show_lines=False, padding=(0, 1))
    table.add_column(escape(f"{y_name} \\ {grid.x.name}" if y_name else grid.x.name))
    for tick in grid.x.ticks:
        table.add_column(escape(tick), justify="right")
    row_ticks = grid.y.ticks if grid.y is not None else [grid.name]
    for tick, row in zip(row_ticks, values):
        table.add_row(escape(tick), *(f"[{style(v)}]{_number(v)}[/]" for v in row))
    return table


def _short_values(values: list) -> str:
    """A sweep variable's values, shortened: [0, 1, 2, ..., 29] (30 values)."""
    if len(values) <= 8:
        return str(values)
    return f"[{', '.join(map(str, values[:3]))}, ..., {values[-1]}] ({len(values)} values)"


def _number(value) -> str:
    value = float(value)
    if value != value:
        return "nan"
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def _exit(code: int) -> None:
    faults = sys.modules.get("nnrun.store._faults")
    if faults is not None and faults.hdf5_broken():
        # HDF5 failed to write a file and may crash while the interpreter shuts down
        # (see nnrun.store._faults): leave without that clean-up; the file is gone.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _strip_debug(args: list[str]) -> tuple[list[str], bool]:
    """Take `--debug` out of the arguments wherever it stands (not after `--`)."""
    end = args.index("--") if "--" in args else len(args)
    kept = [a for a in args[:end] if a != "--debug"] + args[end:]
    return kept, len(kept) != len(args)


def main() -> None:
    """Console entry point: user errors print as one line (exit 1), usage errors
    as typer's usage message (exit 2); only real bugs are called bugs."""
    global _debug
    args, _debug = _strip_debug(sys.argv[1:])
    try:
        # Standalone: typer itself reports usage errors (exit 2), --help and --version.
        app(args=args, prog_name="nnrun", standalone_mode=True)
    except NnrunError as e:
        if _debug:
            raise
        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        _exit(1)
    except KeyboardInterrupt as e:
        if _debug:
            raise
        kept = e.kept if isinstance(e, Interrupted) else "nothing was marked complete"
        err_console.print(f"[red]interrupted[/red]: {escape(kept)}", highlight=False)
        sys.exit(e.exit_code if isinstance(e, Interrupted) else 130)
    except Exception as e:
        if _debug:
            raise
        err_console.print(
            f"[red]internal error:[/red] {escape(f'{type(e).__name__}: {e}')}\n"
            "This is a bug in nnrun; rerun with --debug for the traceback.",
            highlight=False,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
