"""The `nnrun` command line: parse arguments, call nnrun.api, print with rich.

Every verb is a few lines over a library function; errors meant for the user
print as one message (exit 1), and `--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nnrun.errors import NnrunError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run declarative experiments on neural-network internals (see `nnrun COMMAND --help`).",
)
console = Console()
# soft_wrap: an error stays on one line when stderr is a pipe or a CI log.
err_console = Console(stderr=True, soft_wrap=True)
_debug = False


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    global _debug
    _debug = debug


SpecArg = Annotated[Path, typer.Argument(help="The spec file (YAML or JSON).")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a spec key: -s generate.max_new_tokens=8"),
]
OutputOption = Annotated[
    Path | None, typer.Option("--output", "-o", help="Output file (default: the spec's)")
]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue an interrupted sweep from its partial file.")
]
YesOption = Annotated[
    bool, typer.Option("--yes", "-y", help="Run a sweep of more than 10,000 points.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


@app.command()
def run(
    spec: SpecArg,
    set_: SetOption = None,
    output: OutputOption = None,
    resume: ResumeOption = False,
    yes: YesOption = False,
    quiet: QuietOption = False,
) -> None:
    """Run an experiment (every point of its sweep, if it has one) and write its HDF5 file."""
    from nnrun import api

    with _progress_bar(quiet) as (progress, log):
        results = api.run(
            spec, set_ or (), output=output, progress=progress, log=log, resume=resume, yes=yes
        )
    _print_summary(results)
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
    resume: ResumeOption = False,
    yes: YesOption = False,
    quiet: QuietOption = False,
) -> None:
    """Run a sweep: the same as `nnrun run` (which runs sweeps too)."""
    run(spec, set_, output, resume, yes, quiet)


@contextmanager
def _progress_bar(quiet: bool) -> Iterator[tuple[Any, Any]]:
    """A rich progress bar on stderr over a run's rows (and sweep points), or nothing."""
    if quiet:
        yield None, None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[points]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("loading model ...", total=None, points="")

        def progress(state: Any) -> None:
            points = ""
            if state.points_total > 1:
                points = f"points {state.points_done}/{state.points_total}"
                if state.points_failed:
                    points += f" ({state.points_failed} failed)"
            description = "rows" if state.stage == "running" else f"{state.stage} ..."
            bar.update(
                task,
                completed=state.rows_done,
                total=state.rows_total,
                description=description,
                points=points,
            )

        def log(message: str) -> None:
            bar.console.print(f"[dim]{message}[/dim]")

        yield progress, log


@app.command()
def validate(
    specs: Annotated[list[Path], typer.Argument(help="Spec files to check.")],
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
            loaded = load_spec(path, set_ or ())
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
def schema() -> None:
    """Print the JSON Schema of the spec format."""
    from nnrun.spec import schema_path

    sys.stdout.write(schema_path().read_text())


@app.command()
def plan(
    spec: Annotated[Path, typer.Argument(help="The spec file (YAML or JSON).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override a spec key (key.path=value).")
    ] = None,
) -> None:
    """Show the compiled plan: sites in execution order, actions, batches, output size."""
    from nnrun import api
    from nnrun.compile import describe_plan

    report = api.plan(spec, set_ or (), log=_log)
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
    for column in ("dataset", "estimated shape", "estimated bytes"):
        layout.add_column(column)
    for name, shape in report.save_shapes.items():
        layout.add_row(f"saves/{name}", str(shape), f"{report.save_bytes[name]:,}")
    for name, shape in report.metric_shapes.items():
        layout.add_row(f"metrics/{name}", str(shape), "")
    console.print(layout)
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
        console.print(
            "[dim]rows that do not depend on a sweep variable are shared by every point; "
            "a batch also carries the source rows its edits read[/dim]"
        )
    else:
        sources = (
            f", plus source rows {', '.join(compiled.source_prompts)} in every batch"
            if compiled.source_prompts
            else ""
        )
        console.print(
            f"{report.prompt_count} prompts in {report.batches} batch(es) of up to "
            f"{compiled.batch_size}{sources}; {compiled.passes} forward pass per batch; "
            f"about {sum(report.save_bytes.values()):,} bytes to {compiled.output}"
        )
    for warning in compiled.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


_MAX_PLAN_ROWS = 80


@app.command()
def modules(
    model: Annotated[
        str, typer.Argument(help="A model dir, a .gguf file, a spec file, or a builtin name.")
    ] = "smollm2-135m-instruct",
    prompt: Annotated[str | None, typer.Option(help="Sample prompt used to find shapes.")] = None,
    depth: Annotated[int | None, typer.Option(help="Show modules down to this depth only.")] = None,
) -> None:
    """List a model's module paths with their output shapes for a sample prompt."""
    from nnrun import api

    model_spec, sample = api.model_spec_for(model)
    rows, name = api.module_tree(model_spec, prompt or sample, log=_log)
    table = Table(title=f"{name}: modules (shapes for {prompt or sample!r})")
    for column in ("path", "class", "output shape"):
        table.add_column(column)
    for row in rows:
        if depth is not None and row.depth > depth:
            continue
        shown = "(does not run)" if row.output is None and row.input is None else str(row.output)
        path = "  " * max(0, row.depth - 1) + (row.path or "(model)")
        table.add_row(escape(path), row.cls, escape(shown))
    console.print(table)
    console.print(
        "[dim]write a location as PATH.output or PATH.input, e.g. "
        f"{rows[-1].path or 'layer'}.output[/dim]"
    )


@app.command()
def show(
    output: Annotated[Path, typer.Argument(help="An nnrun output file (.h5).")],
) -> None:
    """Show an output file: provenance, prompts, saves with shapes and axes."""
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
        table.add_row("sweep", escape(", ".join(f"{k} = {_short(v)}" for k, v in coords.items())))
        counts = {s: sum(p["status"] == s for p in points) for s in ("done", "failed", "pending")}
        table.add_row(
            "points", ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" of {len(points)}"
        )
    console.print(table)
    _print_summary(results)


@app.command()
def plot(
    output: Annotated[Path, typer.Argument(help="An nnrun output file (.h5) of a sweep.")],
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
    """Plot a sweep: a line for one sweep variable, a labelled heatmap for two."""
    from nnrun import plot as draw

    written = draw(output, name, figure, prompt=prompt, reduce=reduce)
    console.print(f"wrote {written}")


def _log(message: str) -> None:
    err_console.print(f"[dim]{message}[/dim]")


def _print_summary(results) -> None:
    from nnrun import api

    table = Table(title=f"{results.path} ({results.status})")
    for column in ("save", "axes", "shape", "dtype", "bytes"):
        table.add_column(column)
    for name, row in api.describe_saves(results).items():
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
    for name, by_prompt in api.top_next_tokens(results).items():
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


def _short(values: list) -> str:
    """A sweep variable's values, shortened: [0, 1, 2, ..., 29] (30 values)."""
    if len(values) <= 8:
        return str(values)
    return f"[{', '.join(map(str, values[:3]))}, ..., {values[-1]}] ({len(values)} values)"


def _number(value) -> str:
    value = float(value)
    if value != value:
        return "nan"
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def _stop_on_sigterm() -> None:
    """SIGTERM stops a run like Ctrl-C: the output file is closed and left marked partial."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main() -> None:
    """Console entry point: user errors print as one line, exit 1."""
    _stop_on_sigterm()
    try:
        code = app(standalone_mode=False)
    except NnrunError as e:
        if _debug:
            raise
        err_console.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]: no output was marked complete")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        if _debug:
            raise
        err_console.print(
            f"[red]internal error:[/red] {type(e).__name__}: {e}\n"
            "This is a bug in nnrun; rerun with --debug for the traceback.",
            highlight=False,
        )
        sys.exit(2)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
