"""docs/cli.md, generated from the typer app (tests/test_tools.py keeps it current).

Regenerate with:  .venv/bin/python -m nnrun._docs > docs/cli.md
"""

from __future__ import annotations

HEADER = """\
<!-- Generated from nnrun/cli.py by `python -m nnrun._docs > docs/cli.md`; do not edit. -->
# nnrun command line

Documents: every `nnrun` command and option, as `nnrun COMMAND --help` prints them.
Specs are described in [spec-reference.md](spec-reference.md).

"""


def cli_markdown() -> str:
    """Markdown for every command of the `nnrun` CLI."""
    import click
    import typer
    from typer.cli import get_docs_for_click

    from nnrun.cli import app

    command = typer.main.get_command(app)
    ctx = click.Context(command, info_name="nnrun")
    body = get_docs_for_click(obj=command, ctx=ctx, name="nnrun", title="nnrun")
    # The first heading is the program itself: the header above already says it.
    body = body.split("\n", 1)[1] if body.startswith("# ") else body
    return HEADER + body.strip() + "\n"


if __name__ == "__main__":
    print(cli_markdown(), end="")
