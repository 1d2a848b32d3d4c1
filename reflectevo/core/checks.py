"""Small checks shared by the schema and the prompts."""

from __future__ import annotations

import difflib
from typing import Any


def reject_duplicates(values: list[Any], what: str) -> list[Any]:
    if len(set(values)) != len(values):
        raise ValueError(f"{what} is listed twice")
    return values


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
