"""Built once, under a lock, into the model cache: what every built-in model folder goes through."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _build_once(final: Path, marker: str, what: str, build: Callable[[Path], Any]) -> Path:
    """``final``, built by ``build(staging)`` first unless it holds ``marker`` (a file a build writes).

    Safe from several processes at once: one builds into a temporary folder beside ``final`` and
    renames it into place when complete; the others wait on the lock and then use its result.
    """
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(final.parent / f".{final.name}.lock", what=what):
        if (final / marker).is_file():
            return final  # built by another process while this one waited
        if final.exists():  # an incomplete folder left by hand: a complete one always has the marker
            shutil.rmtree(final)
        # staging folders of builders that were killed: whoever holds the lock is the only builder alive
        for stale in final.parent.glob(f".{final.name}-*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            build(staging)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


@contextlib.contextmanager
def _exclusive_lock(path: Path, what: str) -> Iterator[None]:
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _announce(f"waiting for another process that is building {what}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _announce(message: str) -> None:
    # a build takes minutes: say so even when the application has not configured logging
    log.info(message)
    if not log.hasHandlers():
        print(f"reflectevo: {message}", file=sys.stderr, flush=True)


def build_versions() -> dict[str, str]:
    """The Python, torch and transformers versions a built-in model was built with, for its record."""
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
