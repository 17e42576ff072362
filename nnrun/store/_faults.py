"""A write that failed half way (a full disk, a file size limit): give the file up safely.

When HDF5 cannot write, its cache keeps dirty data that it tries, and fails, to write
again each time an object of the file is closed; closing them then ends in a
segmentation fault. So a failed file is abandoned instead: every handle that is still
open is marked so that Python never closes it, and the file is removed. Those few
handles stay open until the process exits.
"""

from __future__ import annotations

import contextlib
import errno
import re
from pathlib import Path
from typing import Any

from nnrun.store._paths import describe_os_error

_HDF5_REASON = re.compile(r"errno = (\d+), error message = '([^']*)'")


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
    """Stop all use of an h5py File that failed to write, and remove it from disk."""
    import h5py

    with contextlib.suppress(Exception):
        for handle in h5py.h5f.get_obj_ids(file.id, h5py.h5f.OBJ_ALL):
            handle.locked = True  # a locked id is never closed by Python
        file.id.locked = True
    with contextlib.suppress(OSError):
        path.unlink()
