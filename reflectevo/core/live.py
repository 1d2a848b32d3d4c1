"""Progress lines from a stage's kernel to the terminal of `reflectevo run`.

The runner names a file in ``REFLECTEVO_LIVE`` before it starts a notebook's kernel; code in the kernel
(generation, training) appends one JSON line per event and the runner prints them as they come. Without
the variable (a notebook opened in Jupyter, papermill alone, the tests) every call is a no-op, and the
notebook's own progress bars are untouched either way.
"""

from __future__ import annotations

import json
import os
import time

LIVE_ENV = "REFLECTEVO_LIVE"
INTERVAL_S = 5.0  # at most one progress line per bar this often, so a long stage prints a line every few seconds


def enabled() -> bool:
    return bool(os.environ.get(LIVE_ENV))


def report(kind: str, text: str) -> None:
    """One line for the terminal; never raises (the terminal is a convenience, the stage's work is not)."""
    path = os.environ.get(LIVE_ENV)
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": time.time(), "kind": kind, "text": text}, ensure_ascii=False) + "\n")
    except OSError:
        pass


class Progress:
    """A bar's terminal twin: ``update(done)`` reports at most every :data:`INTERVAL_S` seconds, and always
    when ``done`` reaches ``total``."""

    def __init__(self, what: str, total: int, unit: str) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.started = time.monotonic()
        self.last = -INTERVAL_S

    def update(self, done: int, extra: str = "") -> None:
        if not enabled():
            return
        now = time.monotonic()
        if done < self.total and now - self.last < INTERVAL_S:
            return
        self.last = now
        elapsed = now - self.started
        share = done / self.total if self.total else 1.0
        left = f", {elapsed / share - elapsed:.0f} s left" if 0 < share < 1 else ""
        report(
            "progress",
            f"{self.what}: {done}/{self.total} {self.unit} ({share:.0%}, {elapsed:.0f} s{left})"
            + (f", {extra}" if extra else ""),
        )
