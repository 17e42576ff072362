"""The `nnrun` command line: parse arguments, call nnrun.api, print with rich.

Every verb is a few lines over a library function; errors meant for the user
print as one message (exit 1), and `--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from nnrun.errors import NnrunError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run declarative experiments on neural-network internals (see `nnrun COMMAND --help`).",
)
console = Console()
err_console = Console(stderr=True)
_debug = False


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    global _debug
    _debug = debug


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="The spec file (YAML or JSON).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a spec key: -s generate.max_new_tokens=8"),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output file (default: the spec's)")
    ] = None,
) -> None:
    """Run an experiment and write its HDF5 output file."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from nnrun import api

    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=err_console, transient=True,
    ) as bar:
        task = bar.add_task("prompts", total=None)

        def progress(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        def log(message: str) -> None:
            bar.console.print(f"[dim]{message}[/dim]")

        results = api.run(spec, set_ or (), output=output, progress=progress, log=log)
    _print_summary(results)


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
def show(
    output: Annotated[Path, typer.Argument(help="An nnrun output file (.h5).")],
) -> None:
    """Show an output file: provenance, prompts, saves with shapes and axes."""
    from nnrun.store import load

    results = load(output)
    table = Table(title=str(output), show_header=False, box=None)
    for key in ("status", "nnrun_version", "model_name", "model_class", "device", "seed",
                "spec_sha256", "git_commit", "finished_utc"):
        if key in results.attrs:
            table.add_row(key, str(results.attrs[key]))
    console.print(table)
    _print_summary(results)


def _print_summary(results) -> None:
    from nnrun import api

    table = Table(title=f"{results.path} ({results.status})")
    for column in ("save", "axes", "shape", "dtype", "bytes"):
        table.add_column(column)
    for name, row in api.describe_saves(results).items():
        table.add_row(name, row["axes"], row["shape"], row["dtype"], f"{row['bytes']:,}")
    console.print(table)
    for name, by_prompt in api.top_next_tokens(results).items():
        top = Table(title=f"top next tokens ({name})")
        top.add_column("prompt")
        top.add_column("top tokens (probability)")
        for prompt, tokens in by_prompt.items():
            top.add_row(prompt, "  ".join(f"{t!r} {p:.3f}" for t, p in tokens))
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
