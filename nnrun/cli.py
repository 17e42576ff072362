"""The `nnrun` command line: parse arguments, call nnrun.api, print with rich.

Every verb is a few lines over a library function; errors meant for the user
print as one message (exit 1), usage errors print typer's usage message (exit 2),
and `--debug` (anywhere on the line) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nnrun.errors import Interrupted, NnrunError

app = typer.Typer(
    add_completion=False,
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


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="The spec file (YAML or JSON).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a spec key: -s generate.max_new_tokens=8"),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="Output file (default: the spec's); ending in / puts the spec's file name there.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output file.")
    ] = False,
) -> None:
    """Run an experiment and write its HDF5 output file."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from nnrun import api

    try:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        ) as bar:
            task = bar.add_task("prompts", total=None)

            def progress(done: int, total: int | None) -> None:
                bar.update(task, completed=done, total=total)

            def log(message: str) -> None:
                bar.console.print(f"[dim]{message}[/dim]")

            results = api.run(
                spec, set_ or (), output=output, overwrite=overwrite, progress=progress, log=log
            )
    except Interrupted as e:
        # One line: what stopped the run and what it left where (130 for Ctrl-C, 143 for TERM).
        err_console.print(f"[red]{escape(str(e))}[/red]", highlight=False)
        raise typer.Exit(e.exit_code) from None
    _print_summary(results, top_tokens=True)


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
    _print_summary(results, top_tokens=False)


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


def _print_summary(results, *, top_tokens: bool) -> None:
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
    # Only for a file this process just wrote: the tokenizer path comes from the file.
    for name, by_prompt in (api.top_next_tokens(results) if top_tokens else {}).items():
        top = Table(title=f"top next tokens ({name})")
        top.add_column("prompt")
        top.add_column("top tokens (probability)")
        for prompt, tokens in by_prompt.items():
            top.add_row(escape(prompt), escape("  ".join(f"{t!r} {p:.3f}" for t, p in tokens)))
        console.print(top)


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
