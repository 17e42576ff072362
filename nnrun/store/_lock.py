"""One run per output path: a lock taken before any file is opened or truncated.

`claim_output` checks the path, takes an exclusive `flock` on `<out>.lock` next to
it, refuses an existing output unless overwriting, and holds all that for the length
of the run, with SIGINT and SIGTERM turned into `Interrupted` (see `_signals`). A
second run with the same output is refused at once, before it loads a model or
touches the first run's partial file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType

from nnrun.errors import Interrupted, OutputError
from nnrun.store._paths import (
    check_not_existing,
    check_output_path,
    describe_os_error,
    partial_path,
)
from nnrun.store._signals import signals_as_interrupts

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: O_EXCL creation below stands in
    fcntl = None  # type: ignore[assignment]


def lock_path(path: Path) -> Path:
    """The lock file of an output: `runs/x.h5` -> `runs/x.h5.lock`."""
    return path.with_name(path.name + ".lock")


class OutputLock:
    """An exclusive lock on one output path, held through an open file descriptor."""

    def __init__(self, path: Path) -> None:
        self.path = lock_path(path)
        self.output = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise OutputError naming the run that holds it."""
        for _ in range(100):  # retried only when the holder removed the file meanwhile
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                raise OutputError(
                    f"cannot write in {self.output.parent or '.'}: {describe_os_error(e)}"
                ) from None
            if not _try_lock(fd):
                os.close(fd)
                raise OutputError(
                    f"another run{self._holder()} is writing {self.output} right now; wait for "
                    f"it to finish or choose another output (-o)"
                )
            # The holder may have released and removed the file between our open and
            # our lock: then we hold a lock on a file nobody else will ever see.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)
        raise OutputError(f"could not lock {self.path}: it keeps disappearing")

    def release(self) -> None:
        """Remove the lock file and let go (removing first, so no one locks a stale file)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (process {pid})" if pid.isdigit() else ""


def _try_lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks (some network mounts): go on unlocked
        return True
    return True


class claim_output:  # noqa: N801 - used as a function: `with claim_output(path):`
    """Own an output path for the length of a run.

    On entry: check the path (before any model loads), take its lock, refuse an
    existing output unless `overwrite`. Inside: SIGINT/SIGTERM raise Interrupted.
    On an interrupt the exception's `kept` says what is left on disk.

    >>> with claim_output(Path("runs/x.h5"), overwrite=False):   # doctest: +SKIP
    ...     run_and_write()
    """

    def __init__(self, path: Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self._signals = signals_as_interrupts()
        self._before: dict[Path, tuple[int, int] | None] = {}

    def __enter__(self) -> claim_output:
        check_output_path(self.path)  # first: the names below need a file name
        self.partial = partial_path(self.path)
        self._lock = OutputLock(self.path)
        self._signals.__enter__()
        try:
            self._lock.acquire()
            check_not_existing(self.path, overwrite=self.overwrite)
        except BaseException:
            self._lock.release()
            self._signals.__exit__(None, None, None)
            raise
        self._before = {p: _identity(p) for p in (self.path, self.partial)}
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()
        self._signals.__exit__(None, None, None)
        if isinstance(exc, KeyboardInterrupt):
            interrupted = exc if isinstance(exc, Interrupted) else Interrupted(2)
            interrupted.kept = self.kept()
            if interrupted is not exc:
                raise interrupted from exc

    def kept(self) -> str:
        """What a stopped run left on disk, in one sentence."""
        wrote_partial = _identity(self.partial) not in (None, self._before.get(self.partial))
        completed = _identity(self.path) not in (None, self._before.get(self.path))
        if completed:
            return f"{self.path} was already complete when the signal arrived"
        earlier = (
            f"; the earlier {self.path} was not touched" if self._before.get(self.path) else ""
        )
        if wrote_partial:
            return f"kept the unfinished output {self.partial} (status partial){earlier}"
        return f"nothing was written{earlier}"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)
