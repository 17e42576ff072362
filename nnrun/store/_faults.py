"""A full disk or a file size limit: see it coming, and give the file up safely if not.

Once HDF5 fails to write, its cache keeps dirty data that it tries, and fails, to
write again whenever an object of the file is closed, and the library is left in a
state where closing the file, or the interpreter's exit, can end in a segmentation
fault. So the writer first checks before every batch that the batch fits (free space
and `ulimit -f`), with room to spare for closing the file: a run that cannot go on
stops with a readable file marked partial. Should a write fail all the same (another
process filled the disk), the file is given up: its descriptor is pointed at
/dev/null, where every write succeeds, it is closed, and removed; `hdf5_broken()`
then tells the command line to exit without the interpreter's usual clean-up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nnrun.errors import OutputError
from nnrun.store._paths import describe_os_error

_HDF5_REASON = re.compile(r"errno = (\d+), error message = '([^']*)'")
# Kept free beyond a batch's own bytes: HDF5 metadata, a partly filled chunk, closing.
_SPARE_BYTES = 1 << 20
_broken = False


def hdf5_broken() -> bool:
    """Whether a file had to be given up after HDF5 failed to write (see the module doc)."""
    return _broken


def check_room(path: Path, needed: int) -> None:
    """Raise OutputError unless `needed` more bytes (plus spare) fit in the file at `path`."""
    import resource

    needed += _SPARE_BYTES + needed // 10
    try:
        size = path.stat().st_size
        fs = os.statvfs(path.parent)
    except OSError:
        return  # nothing to measure with: the write itself will tell
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    free = fs.f_bavail * fs.f_frsize
    if limit != resource.RLIM_INFINITY and size + needed > limit:
        raise OutputError(
            f"the next batch would take {path} past the file size limit of {_mb(limit)} "
            f"(ulimit -f); the run stops here"
        )
    if needed > free:
        raise OutputError(
            f"no room for the next batch in {path.parent}: it needs about {_mb(needed)} and "
            f"{_mb(free)} are free; the run stops here"
        )


@contextlib.contextmanager
def quiet_failed_closes() -> Iterator[None]:
    """Keep off the terminal the tracebacks h5py prints when objects of a file it cannot
    write are freed ("Exception ignored in ObjectID.__dealloc__"); the writer reports
    the failure once, in words. Cython prints them through both hooks below."""
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def quiet_unraisable(info: Any) -> None:
        if not is_write_failure(info.exc_value):
            unraisable(info)

    def quiet_excepthook(kind: Any, value: BaseException, tb: Any) -> None:
        if not is_write_failure(value):
            excepthook(kind, value, tb)

    sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook
    try:
        yield
    finally:
        sys.unraisablehook, sys.excepthook = unraisable, excepthook


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def is_write_failure(e: BaseException) -> bool:
    """Whether an exception from h5py means the file could not be written (disk, limits)."""
    if not isinstance(e, OSError | RuntimeError):
        return False
    if isinstance(e, OSError) and e.errno is not None:
        return True
    text = str(e)
    return "errno" in text or "write failed" in text or "flush" in text


def write_failure_reason(e: BaseException) -> str:
    """The cause of a failed write in words (from HDF5's message when it has one)."""
    if isinstance(e, OSError) and e.errno is not None:
        return describe_os_error(e)
    found = _HDF5_REASON.search(str(e))
    if found:
        code, text = int(found.group(1)), found.group(2)
        return describe_os_error(OSError(code, text)) if code in errno.errorcode else text
    return " ".join(str(e).split())[:200]


def abandon_hdf5(file: Any, path: Path) -> None:
    """Close an h5py File that failed to write without writing anything more, and remove it."""
    import h5py

    global _broken
    _broken = True
    try:
        fd = file.id.get_vfd_handle()
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
        with contextlib.suppress(Exception):
            file.close()
    except Exception:  # no descriptor to redirect (another driver): never close it instead
        with contextlib.suppress(Exception):
            for handle in h5py.h5f.get_obj_ids(file.id, h5py.h5f.OBJ_ALL):
                handle.locked = True  # a locked id is never closed by Python
            file.id.locked = True
    with contextlib.suppress(OSError):
        path.unlink()
