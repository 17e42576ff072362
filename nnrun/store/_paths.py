"""Where an output file goes, checked before a model is loaded.

Every problem with an output path (a directory or a device in the way, a parent that
is a file or cannot be created, an existing output) is found here, before minutes are
spent loading a model and running prompts, and reported as one OutputError.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from nnrun.errors import OutputError


def partial_path(path: Path) -> Path:
    """Where an unfinished output lives: `runs/x.h5` -> `runs/x.partial.h5`."""
    return path.with_name(path.stem + ".partial" + path.suffix)


def output_path(given: str | Path, spec_output: str | Path | None = None, name: str = "") -> Path:
    """The output file a `-o` value (or a spec's `output:`) names.

    A value ending in a slash names a directory: the file goes inside it under the
    file name of `spec_output` (`-o results/` with `output: runs/exp.h5` gives
    `results/exp.h5`), or `<name>.h5` when the spec's output is a directory too.
    Anything else is the file itself.
    """
    text = os.fspath(given)
    if not text.strip():
        raise OutputError("the output path is empty")
    if "\x00" in text:
        raise OutputError(f"the output path {text!r} contains a NUL character")
    if not text.endswith(("/", os.sep)):
        return Path(text)
    spec_text = "" if spec_output is None else os.fspath(spec_output)
    file_name = "" if spec_text.endswith(("/", os.sep)) else Path(spec_text).name
    file_name = file_name or (f"{name}.h5" if name else "")
    if not file_name:
        raise OutputError(
            f"{text} names a directory and there is no file name to put in it; "
            "write the file name too (DIR/NAME.h5)"
        )
    return Path(text) / file_name


def check_output_path(path: Path) -> None:
    """Refuse an output path nnrun cannot write; create its directory.

    Refused: a directory, a device, a pipe or anything else that is not a regular
    file at the path or at its `.partial` sibling, and a parent that is not a
    directory or cannot be created. Permissions are checked by the caller taking
    the lock (creating a file is the real test).
    """
    if path.name in ("", ".", "..") or _kind_of(path) == "directory":
        raise OutputError(
            f"the output path {path} is a directory; name a file (-o {path}/NAME.h5), or end "
            f"the path with a slash (-o {path}/) to write the spec's file name into it"
        )
    for candidate, what in ((path, "the output path"), (partial_path(path), "the partial file")):
        kind = _kind_of(candidate)
        if kind not in (None, "file"):
            raise OutputError(f"{what} {candidate} is {kind}, not a regular file; choose another")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(
            f"cannot create the output directory {parent}: {_first_file(parent)} is a file"
        ) from None
    except OSError as e:
        raise OutputError(
            f"cannot create the output directory {parent}: {e.strerror or e}"
        ) from None


def check_not_existing(path: Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to (checked under the lock)."""
    if not overwrite and _kind_of(path) is not None:
        raise OutputError(
            f"{path} already exists; pass --overwrite (overwrite=True in Python) to replace it, "
            "or choose another output (-o, or ${timestamp} in the spec's output)"
        )


def describe_os_error(e: OSError) -> str:
    """A short reason for an OSError, in words a user can act on."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if e.errno == errno.EFBIG:
        return "file too large (a file size limit, ulimit -f, or the file system's maximum)"
    if e.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return e.strerror or str(e)


def _kind_of(path: Path) -> str | None:
    """What is at a path: None (nothing), 'file', 'directory' or another kind in words."""
    try:
        mode = path.stat().st_mode  # follows links: a link to a file is fine
    except FileNotFoundError:
        return None if not path.is_symlink() else "a broken symbolic link"
    except NotADirectoryError:
        return None  # a parent is a file: reported when the directory is created
    except OSError as e:
        raise OutputError(f"cannot use {path} as the output: {describe_os_error(e)}") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _first_file(directory: Path) -> Path:
    """The first component of a path that exists and is not a directory."""
    for candidate in reversed([directory, *directory.parents]):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return directory
