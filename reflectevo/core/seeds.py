"""Derived seeds and canonical hashes: one stream per use, equal data gives an equal hash."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed derived from the run seed and names ("|"-joined, sha256), so that each use
    (a task's split, one question's instructions) has its own stream and never shifts another's."""
    digest = hashlib.sha256("|".join(str(part) for part in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def canonical_hash(value: Any) -> str:
    """sha256 of a canonical JSON rendering (sorted keys, no whitespace): equal data, equal hash."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
