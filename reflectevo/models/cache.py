"""The model cache folder (REFLECTEVO_CACHE, else the user cache)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


def cache_dir() -> Path:
    """Where built models and tokenizers are kept: ``$REFLECTEVO_CACHE``, else
    ``$XDG_CACHE_HOME/reflectevo``, else ``~/.cache/reflectevo``. Not created here."""
    configured = os.environ.get("REFLECTEVO_CACHE")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "reflectevo"
