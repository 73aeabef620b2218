"""Ctrl-C and SIGTERM stop a run the same way: where it stopped is recorded and a re-run resumes.

SIGTERM is what ``kill`` sends by default and what SLURM sends before a time-limit kill. The
``spon-exp`` command (and only it: library code leaves SIGTERM alone) installs
:func:`sigterm_as_interrupt` for its lifetime: SIGTERM then raises :class:`Terminated`, a
``KeyboardInterrupt``, so the run records ``interrupted`` and its stage, as for Ctrl-C, and the
command exits 143 (128 + SIGTERM) instead of 130. Jobs that submitit runs never pass through
the command, so submitit's own handlers (its requeue on a time limit) stay as they are.

:func:`signals_deferred` holds both signals while a file that must not be torn is written (a
training checkpoint) and delivers them, to whichever handler was there before, right after.
"""

from __future__ import annotations

import contextlib
import signal
import threading

#: exit code of a command stopped by SIGTERM (Ctrl-C: 130)
SIGTERM_EXIT = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by the handler :func:`sigterm_as_interrupt` installs."""


def terminated(e: BaseException | None) -> bool:
    """Whether ``e`` is, or was raised while handling, a :class:`Terminated` (training turns any
    interrupt into its own ``TrainingInterrupted``, which keeps the original as its context)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, Terminated):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _raise_terminated(signum, frame) -> None:
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` inside the block (main thread only; the previous
    handler is restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred():
    """Hold a Ctrl-C (SIGINT) or SIGTERM that arrives inside the block until it ends, then
    deliver it to the handler that was in place (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for s in dict.fromkeys(received):  # an ignored signal stays ignored; the default one acts now
        signal.raise_signal(s)
