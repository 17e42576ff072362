"""Shell completion for `nnrun` (installed with `nnrun --install-completion`).

Completers run on every <TAB>: they stay cheap (no torch import) and never fail loudly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def _paths(incomplete: str, suffixes: tuple[str, ...]) -> list[str]:
    base = Path(incomplete).expanduser()
    folder = base if incomplete.endswith("/") else base.parent
    try:
        entries = sorted(folder.iterdir()) if str(folder) else sorted(Path(".").iterdir())
    except OSError:
        return []
    out = []
    for entry in entries:
        shown = (
            str(entry)
            if str(folder) not in ("", ".") or incomplete.startswith("./")
            else entry.name
        )
        if entry.is_dir() and not entry.name.startswith("."):
            out.append(shown + "/")
        elif entry.suffix.lower() in suffixes:
            out.append(shown)
    return [p for p in out if p.startswith(incomplete)]


def complete_spec(incomplete: str) -> list[str]:
    """Spec files (and folders) for arguments that take a spec."""
    return _paths(incomplete, SPEC_SUFFIXES)


def complete_output(incomplete: str) -> list[str]:
    """Output files (.h5) and folders."""
    return _paths(incomplete, (".h5", ".hdf5"))


def complete_template(incomplete: str) -> list[str]:
    """Template names for `nnrun init`."""
    try:
        from nnrun._templates import list_templates

        return [t.name for t in list_templates() if t.name.startswith(incomplete)]
    except Exception:  # completion must never print a traceback into the shell
        return []


def complete_save(ctx: Any, incomplete: str) -> list[str]:
    """Save names in the output file given earlier on the command line.

    Works for any verb with an output-file parameter followed by a save name
    (`nnrun plot OUT.h5 NAME`): the first parameter whose value is an existing .h5
    file is read.
    """
    try:
        import h5py

        for value in (ctx.params or {}).values():
            path = Path(str(value)) if isinstance(value, str | Path) else None
            if path is not None and path.suffix in (".h5", ".hdf5") and path.is_file():
                with h5py.File(path, "r") as f:
                    names = list(f["saves"]) if "saves" in f else []
                return [n for n in names if n.startswith(incomplete)]
    except Exception:
        return []
    return []
