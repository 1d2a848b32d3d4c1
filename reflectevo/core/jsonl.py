"""Reading JSON Lines files with errors that name the file and the line."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from reflectevo.core.files import atomic_write
from reflectevo.errors import DataError, DataFileNotFound


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file.

    Raises :class:`DataFileNotFound` for a missing file and :class:`DataError` naming
    ``path:line`` for a line that is not a JSON object (or not UTF-8). A byte-order mark is skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"data file not found: {path}")
    # surrogateescape turns bytes that are not UTF-8 into lone surrogates, so the bad line can be named
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            bad = _UNDECODABLE.search(line)
            if bad is not None:
                raise DataError(
                    f"{where}: not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x} at column {bad.start() + 1}); "
                    "save the file as UTF-8"
                )
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except ValueError:  # Python refuses to convert integers of more than 4300 digits
                raise DataError(
                    f"{where}: a number too long to read (more than {sys.get_int_max_str_digits()} digits)"
                ) from None
            except RecursionError:
                raise DataError(f"{where}: lists or objects nested too deeply to read") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if "\\u" in line:
                reject_lone_surrogates(row, where)
            yield line_number, row


def reject_lone_surrogates(value: object, where: str) -> None:
    """A ``"\\ud83d"`` escape without its pair decodes, but cannot be written back as UTF-8: refuse it here."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: a \\u escape is half of a surrogate pair (a broken emoji or symbol)") from None


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows as JSONL, atomically (:func:`reflectevo.core.files.atomic_write`): a reader never sees a
    half-written file, and a failure leaves no partial file behind."""

    def write(handle) -> None:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(path, write, mode="w")
    return Path(path)
