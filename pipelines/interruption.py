"""An operator's Ctrl-C (SIGINT) or a scheduler's SIGTERM ends a run cleanly and resumably.

The first signal is said in one line. While a stage can stop at a safe point (training: a checkpoint at the next step
boundary), it is asked to, within :data:`GRACE_S`; otherwise :class:`Interrupted` is raised at once, in the main
thread, where the runner ends the stage's MLflow runs as KILLED and the command exits 130 (SIGINT) or 143 (SIGTERM)
after stopping the Ray work it started. A second signal does not wait for the safe point; one more during that
clean-up ends the process at once. Work committed before is kept, so the same command resumes.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 20.0  # how long the first signal waits for a stage's safe point before stopping at once


def unwrapped(error: BaseException) -> BaseException:
    """``error``, or the :class:`Interrupted` behind it: a signal that arrives while Ray waits in its C code (e.g.
    ``ray.wait``) has our handler's exception wrapped in a ``SystemError`` ("returned a result with an exception
    set"), the Interrupted as its cause."""
    cause = error.__cause__ or error.__context__
    return cause if isinstance(error, SystemError) and isinstance(cause, Interrupted) else error


class Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` takes it for a failure
    """The run was stopped by a signal; ``exit_code`` is the shell's 128 + signal number (130, 143)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequests:
    """The process's SIGINT/SIGTERM handler (:meth:`install`) and what a signal does at each moment: the first asks
    the registered safe point (:meth:`safe_point`), else raises; the second raises; a later one exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received
        self.raised = False
        self.stopping: Callable[[], None] | None = None  # asks the running stage to stop at its safe point
        self.deadline: threading.Timer | None = None  # the safe point's: then it stops at once

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        """Handle SIGINT and SIGTERM in this (main) thread from now on; Ray Tune keeps its own SIGINT handler off, so
        that a tuning stage stops like any other, and is not committed with the trials it had."""
        os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
        for signum in SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.raised:  # a signal during the clean-up after one: no more waiting
            os._exit(128 + signum)
        first = self.signum is None
        if first:
            self.signum = signum
        if first and self.stopping is not None:
            say(
                f"stopping ({signal.Signals(signum).name}): checkpointing at the next step, then exiting; run the "
                "same command to resume (a second signal stops at once)"
            )
            self.stopping()
            self.deadline = threading.Timer(GRACE_S, _thread.interrupt_main, (signum,))
            self.deadline.daemon = True
            self.deadline.start()
            return
        if first:
            say(f"stopping ({signal.Signals(signum).name}): committed work is kept; run the same command to resume")
        self.raised = True
        raise Interrupted(self.signum or signum)

    @contextlib.contextmanager
    def safe_point(self, stop: Callable[[], None]) -> Iterator[None]:
        """While the block runs, a first signal calls ``stop`` (which asks the work to stop at its next safe point)
        instead of raising; the block then ends by itself. A signal received before the block starts raises."""
        if self.signum is not None:
            self.raised = True
            raise Interrupted(self.signum)
        self.stopping = stop
        try:
            yield
        finally:
            self.stopping = None
            if self.deadline is not None:
                self.deadline.cancel()

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal asked this run to stop (after a stage stopped at its safe point)."""
        if self.signum is not None and not self.raised:
            self.raised = True
            raise Interrupted(self.signum)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


STOP = StopRequests()  # the process's one handler
