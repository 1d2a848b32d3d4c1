"""Files written whole or not at all: temp file, fsync, rename; digests; stale temporaries."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from reflectevo.core.seeds import canonical_hash
from reflectevo.errors import OutputWriteError, ReflectEvoError


def is_write_failure(exc: BaseException) -> bool:
    """An OS error that means the output could not be written (not, say, a missing input file)."""
    import errno

    return (
        isinstance(exc, OSError)
        and not isinstance(exc, ReflectEvoError)
        and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM)
    )


def write_failure(path: Path, exc: OSError) -> OutputWriteError:
    """The clear error for an OS error while writing ``path``: what happened, what was kept, what to do."""
    import errno

    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = (
            f"free space (or raise the quota) on the file system holding {path.parent}, or set run.output_dir "
            "to another disk"
        )
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = f"make {path.parent} writable, or set run.output_dir to a folder you can write"
    else:
        advice = f"check {path.parent}"
    return OutputWriteError(
        f"could not write {path}: {reason} [{errno.errorcode.get(exc.errno or 0, exc.errno)}]. Nothing half-written was "
        f"left: the temporary copy was removed and any earlier {path.name} is unchanged. To go on, {advice}, then rerun "
        "the same command: finished stages and committed generation batches are kept."
    )


# ---- atomic files ------------------------------------------------------------------------------
def atomic_write(
    path: str | Path,
    write: Callable[[IO], None],
    *,
    mode: str = "wb",
    publish: Callable[[Path, Path], Any] | None = None,
) -> Any:
    """The package's one "temporary file, fsync, rename": every file it writes goes through here.

    ``write(handle)`` fills a temporary file beside ``path`` (".<name>.<random>.tmp", the name
    :func:`remove_temporaries` recognises), opened in ``mode`` (text modes in UTF-8). The file is then
    flushed, fsynced, given the usual permissions and put in place by ``publish(temporary, path)``
    (``os.replace`` unless given), whose result is returned. A reader never sees half a file; a failure
    removes the temporary file and leaves any earlier ``path`` as it was, and a disk-full or read-only
    failure becomes an :class:`OutputWriteError` that says what to do.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        usual_permissions(tmp)
        return (publish or os.replace)(tmp, path)  # looked up at call time: the fault tests wrap os.replace
    except BaseException as exc:
        if is_write_failure(exc):
            raise write_failure(path, exc) from exc
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # gone after a rename; left by a link or a failure


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: handle.write(data))
    return Path(path)


def usual_permissions(path: str | Path, directory: bool = False) -> None:
    """Give a file or folder made by ``tempfile`` (owner-only, 0600 / 0700) the permissions a plain
    ``open`` or ``mkdir`` would have given it under the process umask, so outputs stay readable by the group."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name; it replaces ``path`` only if the block succeeds."""
    import shutil

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as exc:
        if is_write_failure(exc):
            raise write_failure(path, exc) from exc
        raise
    try:
        yield tmp
        usual_permissions(tmp, directory=True)
        replace_directory(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(exc):
            raise write_failure(path, exc) from exc
        raise


def replace_directory(new: Path, path: Path) -> None:
    """Rename the finished folder ``new`` to ``path``; a previous ``path`` is moved aside first and
    removed only once the new one is in place."""
    import shutil

    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
    os.replace(new, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# The hidden names the atomic writes above use while they work: ".<name>.<8 random chars>.tmp" (a file
# or folder being written) and ".<name>.old-<8 hex>" (a folder being replaced). A process killed
# mid-write leaves them behind; they are never results.
TEMPORARY_NAME = re.compile(r"^\..+\.(?:[a-z0-9_]{8}\.tmp|old-[0-9a-f]{8})$")


def remove_temporaries(folder: Path, *, prefix: str = ".", recursive: bool = True) -> list[str]:
    """Delete the temporary files and folders killed writers left in ``folder`` (names starting with
    ``prefix``). Only call it where no live process can be writing. Returns what was removed."""
    import shutil

    if not folder.is_dir():
        return []
    found = folder.rglob(f"{prefix}*") if recursive else folder.glob(f"{prefix}*")
    removed = []
    for path in sorted(found, key=lambda p: len(p.parts), reverse=True):
        if TEMPORARY_NAME.match(path.name) and path.exists():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(str(path.relative_to(folder)))
    return sorted(removed)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: str | Path, exclude: Sequence[str] = ()) -> str:
    """One digest of a folder's files (relative paths and contents; hidden files and the relative paths in
    ``exclude`` left out): equal digests, equal folders. The manifest records it for each round's merged
    generator."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts) and str(relative) not in exclude:
            files[str(relative)] = file_sha256(path)
    return canonical_hash(files)
