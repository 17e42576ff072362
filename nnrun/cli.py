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
        try:
            issues = validate_spec(load_spec(path, set_ or ()))
        except NnrunError as e:
            issues = getattr(e, "issues", None) or [str(e)]
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
    table = Table(title=f"plan for {spec} on {report.model_name}")
    for column in ("#", "site", "action", "prompts", "tokens", "steps"):
        table.add_column(column, no_wrap=column in ("#", "site"), overflow="fold")
    for row in describe_plan(compiled):
        cells = (str(row.order), row.site, row.action, row.prompts, row.tokens, row.steps)
        table.add_row(*(escape(c) for c in cells))  # "[layer 0]" is text, not markup
    console.print(table)
    layout = Table(title="output", show_header=True)
    for column in ("save", "estimated shape", "estimated bytes"):
        layout.add_column(column)
    for name, shape in report.save_shapes.items():
        layout.add_row(name, str(shape), f"{report.save_bytes[name]:,}")
    console.print(layout)
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
    console.print(table)
    _print_summary(results)


def _log(message: str) -> None:
    err_console.print(f"[dim]{message}[/dim]")


def _print_summary(results) -> None:
    from nnrun import api

    table = Table(title=f"{results.path} ({results.status})")
    for column in ("save", "axes", "shape", "dtype", "bytes"):
        table.add_column(column)
    for name, row in api.describe_saves(results).items():
        table.add_row(escape(name), row["axes"], row["shape"], row["dtype"], f"{row['bytes']:,}")
    console.print(table)
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


def main() -> None:
    """Console entry point: user errors print as one line, exit 1."""
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
