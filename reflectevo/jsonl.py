"""Reading JSON Lines files with errors that name the file and the line."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from reflectevo.errors import DataError, DataFileNotFound


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file.

    Raises :class:`DataFileNotFound` for a missing file and :class:`DataError` naming
    ``path:line`` for a line that is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"data file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{line_number}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}"
                )
            yield line_number, row


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows as JSONL through a temporary file in the same folder, renamed into place.

    A reader never sees a half-written file, and a failure leaves no partial file behind.
    """
    from reflectevo.runs import usual_permissions

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)  # noqa: SIM115  (closed below, renamed or removed)
    try:
        with handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        usual_permissions(handle.name)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path
