"""A "compiling ..." line with the elapsed time while JAX traces and compiles a fit's programs.

Compilation takes seconds to minutes before the first iteration (ODE models, NUTS), with nothing
else on the screen; this line tells the user the fit is alive from the first second. It is
written to ``stderr`` (where the iteration bars go), rewritten in place every second, and left
out altogether when the block ends within ``delay`` seconds (a compiled program found in the
cache).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["compiling", "ticker"]


@contextmanager
def ticker(doing: str, done: str, enabled: bool = True, *, stream: TextIO | None = None, delay: float = 0.5,
           every: float = 1.0) -> Iterator[None]:
    """While the block runs: ``<doing> ... 3 s`` on ``stream`` (default ``sys.stderr``), first after
    ``delay`` seconds, then just after each further ``every`` seconds (the whole seconds elapsed); at the
    end ``<done> in 4.2 s`` (nothing if the block ended before the first line was due)."""
    if not enabled:
        yield
        return
    out = sys.stderr if stream is None else stream
    live = _overwrites(out)
    start = time.perf_counter()
    finished = threading.Event()
    shown = []

    def show() -> None:
        wait = delay
        while not finished.wait(wait):
            elapsed = time.perf_counter() - start
            ticks = math.floor(elapsed / every + 1e-9)
            if not live:  # a log file or a pipe: one line now, one at the end (no "\r" to overwrite with)
                out.write(f"{doing} ...\n")
                out.flush()
                shown.append(True)
                return
            out.write(f"\r{doing} ... {ticks * every:.0f} s")  # whole seconds elapsed, as a clock shows them
            out.flush()
            shown.append(True)
            wait = (ticks + 1) * every + 0.01 - (time.perf_counter() - start)  # just after the next whole tick

    thread = threading.Thread(target=show, name="nlmegen-ticker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        finished.set()
        thread.join()
        if shown:
            back = "\r" if live else ""  # over the live counter's line
            out.write(f"{back}{done} in {time.perf_counter() - start:.1f} s\n")
            out.flush()


def _overwrites(out: TextIO) -> bool:
    """Whether ``out`` shows a line rewritten by a carriage return: a terminal, or a Jupyter stream."""
    if type(out).__module__.startswith("ipykernel"):
        return True
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def compiling(what: str, enabled: bool = True, *, stream: TextIO | None = None, delay: float = 0.5,
              every: float = 1.0):
    """``compiling <what> ... 3 s`` while the block runs, then ``compiled <what> in 4.2 s`` (see `ticker`)."""
    return ticker(f"compiling {what}", f"compiled {what}", enabled, stream=stream, delay=delay, every=every)
