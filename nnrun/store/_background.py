"""Writing on a thread of its own: batch N goes to the file while batch N+1 computes.

The run loop hands each call for the output file (register a plan, write a batch,
mark points) to a `BackgroundWriter`, which makes them on one thread, in order. The
queue between them is bounded, so a writer slower than the model makes the model
wait instead of piling batches up in memory. On a GPU the model's next pass then
overlaps the host copies and HDF5 writes of the one before; on a CPU the write
overlaps the parts of the forward pass that run without Python's lock.

A call that fails on the writer thread stops the run: the next call (or `drain`)
raises its error in the run loop, and the output file is left as the writer left it
(marked partial, or given up after a failed write; see `_faults`).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from nnrun.errors import NnrunError, OutputError

# Calls waiting for the writer at most (each holds one batch on the host).
QUEUE_DEPTH = 4


class BackgroundWriter:
    """An OutputWriter's `register`, `write` and `mark_points`, made on a writer thread.

    >>> writer = BackgroundWriter(out)           # doctest: +SKIP
    >>> writer.write(result); writer.drain()      # doctest: +SKIP
    >>> writer.close()                            # doctest: +SKIP
    """

    def __init__(self, out: Any, depth: int = QUEUE_DEPTH) -> None:
        self.out = out
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._discard = False  # skip what is still queued (after a failure)
        self._thread = threading.Thread(target=self._work, name="nnrun-writer", daemon=True)
        self._thread.start()

    # -- the run loop's side ---------------------------------------------------

    def register(self, plan: Any) -> None:
        self._put("register", plan)

    def write(self, result: Any) -> None:
        self._put("write", result)

    def mark_points(self, done: list[int], failed: dict[int, str] | None = None) -> None:
        self._put("mark_points", done, failed)

    def drain(self) -> None:
        """Wait until every call so far is made and its batches are in the file."""
        self._put("flush")
        self._queue.join()
        self._raise()

    def close(self) -> None:
        """Make what is queued, then stop the thread (a failed writer skips the rest).

        Called when the run stops for any reason: batches computed before an
        interrupt still reach the partial file. A second interrupt while waiting
        drops what is left.
        """
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(None)
            self._thread.join()
        except BaseException:
            self._discard = True
            self._thread.join()
            raise

    def _put(self, method: str, *args: Any) -> None:
        self._raise()
        self._queue.put((method, args))  # waits while the queue is full

    def _raise(self) -> None:
        error = self._error
        if error is None:
            return
        if isinstance(error, OutputError | KeyboardInterrupt):
            raise error
        # Always an OutputError: the run loop must not take it for a sweep point's
        # failure (it isolates those and goes on).
        if isinstance(error, NnrunError):
            raise OutputError(str(error)) from error
        raise OutputError(
            f"writing {getattr(self.out, 'tmp_path', 'the output')} failed: "
            f"{type(error).__name__}: {error}"
        ) from error

    # -- the writer thread ------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None and not self._discard:
                    method, args = item
                    getattr(self.out, method)(*args)
            except BaseException as e:  # kept for the run loop, which raises it
                self._error = e
            finally:
                self._queue.task_done()
