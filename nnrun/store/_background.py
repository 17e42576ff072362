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
import time
from typing import Any

from nnrun.errors import NnrunError, OutputError
from nnrun.store._buffer import result_bytes

# Calls waiting for the writer at most (each holds a few batches on the host).
QUEUE_DEPTH = 4
# Batches are handed to the writer a few at a time, not one by one: waking a thread
# costs about what a tiny model's pass does. A handover happens at whichever comes
# first: this many rows, this many bytes, or the first batch waiting this long.
HANDOVER_ROWS = 256
HANDOVER_BYTES = 1 << 20
HANDOVER_SECONDS = 0.25


class BackgroundWriter:
    """An OutputWriter's `register`, `write` and `mark_points`, made on a writer thread.

    >>> writer = BackgroundWriter(out)           # doctest: +SKIP
    >>> writer.write(result); writer.drain()      # doctest: +SKIP
    >>> writer.close()                            # doctest: +SKIP

    Only primitives implemented in C are waited on in the run loop's thread (a simple
    queue, plain locks): SIGINT raises `Interrupted` there at any moment, and a
    `threading.Condition` interrupted half way can leave its lock held by no one.
    """

    def __init__(self, out: Any, depth: int = QUEUE_DEPTH) -> None:
        self.out = out
        self._items: queue.SimpleQueue[tuple[str, tuple[Any, ...]] | None] = queue.SimpleQueue()
        # One token per call that may wait for the writer: taking one bounds the queue.
        self._slots: queue.SimpleQueue[bool] = queue.SimpleQueue()
        for _ in range(depth):
            self._slots.put(True)
        self._error: BaseException | None = None
        self._discard = False  # skip what is still queued (after a second interrupt)
        self._batches: list[Any] = []  # written by the run loop, not handed over yet
        self._rows = self._bytes = 0
        self._since = 0.0
        self._thread = threading.Thread(target=self._work, name="nnrun-writer", daemon=True)
        self._thread.start()

    # -- the run loop's side ---------------------------------------------------

    def register(self, plan: Any) -> None:
        self._hand_over()
        self._put("register", plan)

    def write(self, result: Any) -> None:
        """Take one batch; it reaches the writer with the next few (see HANDOVER_*)."""
        self._raise()
        if not self._batches:
            self._since = time.monotonic()
        self._batches.append(result)
        self._rows += len(result.rows or result.prompt_ids)
        self._bytes += result_bytes(result)
        if (
            self._rows >= HANDOVER_ROWS
            or self._bytes >= HANDOVER_BYTES
            or time.monotonic() - self._since >= HANDOVER_SECONDS
        ):
            self._hand_over()

    def mark_points(self, done: list[int], failed: dict[int, str] | None = None) -> None:
        self._hand_over()  # a point is marked after its rows
        self._put("mark_points", done, failed)

    def drain(self) -> None:
        """Wait until every call so far is made and its batches are in the file."""
        self._hand_over()
        done = threading.Lock()
        done.acquire()
        self._put("flush", done)
        done.acquire()  # released by the writer once it got there
        self._raise()

    def close(self) -> None:
        """Make what is queued, then stop the thread (a failed writer skips the rest).

        Called when the run stops for any reason: batches computed before an
        interrupt still reach the partial file. A second interrupt while waiting
        drops what is left.
        """
        if not self._thread.is_alive():
            return
        if self._error is None and self._batches:
            self._items.put(("write_all", (self._batches,)))  # never waits
        self._batches = []
        self._items.put(None)
        try:
            self._thread.join()
        except BaseException:
            self._discard = True
            self._thread.join()
            raise

    def _hand_over(self) -> None:
        if self._batches:
            batches, self._batches = self._batches, []
            self._rows = self._bytes = 0
            self._put("write_all", batches)

    def _put(self, method: str, *args: Any) -> None:
        self._raise()
        self._slots.get()  # waits while `depth` calls are queued
        self._raise()
        self._items.put((method, args))

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
            item = self._items.get()
            if item is None:
                return
            method, args = item
            try:
                if self._error is not None or self._discard:
                    pass
                elif method == "flush":
                    self.out.flush()
                elif method == "write_all":
                    for result in args[0]:
                        self.out.write(result)
                else:
                    getattr(self.out, method)(*args)
            except BaseException as e:  # kept for the run loop, which raises it
                self._error = e
            finally:
                if method == "flush":
                    args[0].release()
                self._slots.put(True)
