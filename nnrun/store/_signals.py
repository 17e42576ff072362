"""SIGINT and SIGTERM during a run: stop cleanly, never in the middle of finishing a file.

While a run owns its output (see `claim_output`), both signals raise `Interrupted` in
the main thread, so the output writer closes its file marked `partial` exactly as it
does for Ctrl-C (SIGTERM would otherwise kill the process with the file half written).
The few statements that turn a finished partial file into the complete output run
inside `signals_deferred()`: a signal arriving there is held until they are done.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nnrun.errors import Interrupted

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_deferring = False
_deferred: list[int] = []
# Signals received while a run owns its output. The handler raises at whatever line
# runs; if that line swallows exceptions (a __del__, a callback), `check_interrupted`
# raises again at the next batch.
_received: list[int] = []


def _handler(signum: int, frame: Any) -> None:
    if _deferring:
        _deferred.append(signum)
        return
    _received.append(signum)
    raise Interrupted(signum)


def check_interrupted() -> None:
    """Raise `Interrupted` if a signal arrived that was swallowed where it was raised."""
    if _received:
        raise Interrupted(_received[0])


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into `Interrupted` for the length of the block.

    Only in the main thread (the only one Python delivers signals to); a signal the
    process ignores (a job started with nohup) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    _received.clear()
    unraisable = sys.unraisablehook

    def quiet(info: Any) -> None:
        # An interrupt raised inside a __del__ or a weakref callback cannot propagate;
        # Python would print it as "Exception ignored". check_interrupted raises it again.
        if not isinstance(info.exc_value, Interrupted):
            unraisable(info)

    sys.unraisablehook = quiet
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, _handler)
    try:
        yield
    finally:
        _received.clear()
        sys.unraisablehook = unraisable
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then raise `Interrupted` for the first.

    A signal held here is raised after the block has finished; if the block itself
    fails, that failure is what propagates.
    """
    global _deferring
    if _deferring:  # nested: the outer block raises
        yield
        return
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        pending = list(_deferred)
        _deferred.clear()
    if pending:
        raise Interrupted(pending[0])
