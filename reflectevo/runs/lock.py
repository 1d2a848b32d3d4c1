"""The writer lock of a run directory: one writer at a time, stale owners detected by pid and start time."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reflectevo.core.files import atomic_write_json, remove_temporaries
from reflectevo.errors import RunLockedError

# The environment variable through which ``reflectevo run`` lets the notebooks it starts write
# into the run it has locked (they join its lock instead of being refused by it).
LOCK_TOKEN_ENV = "REFLECTEVO_RUN_TOKEN"


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ---- the writer lock ---------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/<pid>/stat), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _alive(owner: dict[str, Any]) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process: we cannot tell, so we must not take over
    pid = int(owner.get("pid", -1))
    if pid <= 0 or not _pid_alive(pid):
        return False
    started = _process_start(pid)
    return started is None or owner.get("pid_start") in (None, started)


def _is_this_process(owner: dict[str, Any]) -> bool:
    return (
        owner.get("host") == socket.gethostname()
        and owner.get("pid") == os.getpid()
        and owner.get("pid_start") in (None, _process_start(os.getpid()))
    )


# The lock this process holds per lock file, so that opening a run again in the same process can
# retire the former holder (see RunLock.acquire).
_HELD: dict[Path, RunLock] = {}


class RunLock:
    """The ``.lock`` file of a run directory: one writer at a time, stale locks taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.owned = False
        self.token: str | None = None
        self.superseded = False  # this process opened the run again: the newer RunLock holds the lock

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        # Serialises check-and-take between processes racing for the same lock.
        with open(self.path.with_name(".lock.guard"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}

    def acquire(self, command: str = "") -> str:
        """Take the lock, or join it when this process was started by its holder. Returns a note."""
        joining = os.environ.get(LOCK_TOKEN_ENV)
        with self._guard():
            remove_temporaries(
                self.path.parent, prefix=f".{self.path.name}.", recursive=False
            )  # made under this guard only
            owner = self.read()
            note = "lock taken"
            if owner is not None:
                if joining and owner.get("token") == joining:
                    self.token = joining
                    return "joined the lock of the process that started this one"
                if owner and _is_this_process(owner):
                    # A notebook cell that opens the run, executed again in the same kernel: the kernel
                    # holds the lock already, so it takes it afresh (the former holder's release then
                    # leaves the new token alone) instead of refusing itself.
                    note = "re-opened by the process that held the lock"
                    former = _HELD.get(self.path)
                    if former is not None and former is not self:
                        former.owned, former.token, former.superseded = False, None, True
                elif owner and _alive(owner):
                    raise RunLockedError(
                        f"run {self.path.parent} is being written by pid {owner.get('pid')} on {owner.get('host')} "
                        f"since {owner.get('since')} ({owner.get('command') or 'unknown command'}). Wait for it to "
                        f"finish, or stop it; if that process is gone on another machine, delete {self.path}."
                    )
                else:
                    note = f"took over a stale lock (pid {owner.get('pid')} on {owner.get('host')} is gone)"
            self.token = uuid.uuid4().hex
            record = {
                "pid": os.getpid(),
                "pid_start": _process_start(os.getpid()),
                "host": socket.gethostname(),
                "since": now(),
                "command": command,
                "token": self.token,
            }
            atomic_write_json(self.path, record)
            self.owned = True
            self.superseded = False
            _HELD[self.path] = self
            return note

    def release(self) -> None:
        if not self.owned:
            self.token = None  # a joined lock stays its starter's; this process no longer writes under it
            return
        with self._guard():
            owner = self.read()
            if owner and owner.get("token") == self.token:
                self.path.unlink(missing_ok=True)
        self.owned = False
        if _HELD.get(self.path) is self:
            del _HELD[self.path]
