"""What `reflectevo run` shows while a stage runs, and the summary at the end.

* Each stage's kernel talks to the runner over IPC sockets (files in a private temporary folder) instead
  of TCP on localhost, so no other user of the machine can connect to it and the kernel has no reason to
  warn about unencrypted TCP.
* Section lines: the runner executes the notebook through a papermill engine that prints the notebook's
  ``## `` heading when its first code cell starts.
* Progress lines: the kernel's generation and training code append events to the file named in
  ``REFLECTEVO_LIVE`` (:mod:`reflectevo.core.live`); a thread here prints them as they arrive.
* The summary: seconds per stage, the headline table of stage 05 and the path of report.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from reflectevo.core.live import LIVE_ENV

Printer = Callable[[str], None]
ENGINE = "reflectevo-live"
INDENT = "    "


def ipc_kernel_manager_class():
    """A jupyter_client kernel manager whose kernels listen on IPC sockets in a private temporary folder."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):  # nbclient drives its kernels asynchronously
        @default("transport")
        def _transport_default(self) -> str:
            return "ipc"

        @default("ip")
        def _ip_default(self) -> str:
            # the socket files go in a folder only this user can read, not in the working directory
            return str(Path(tempfile.mkdtemp(prefix="reflectevo-kernel-")) / "kernel")

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            if not restart:
                shutil.rmtree(Path(self.ip).parent, ignore_errors=True)

    return IPCKernelManager


def section_headings(nb: Any) -> dict[int, str]:
    """Cell index -> heading, for the first code cell after each ``## `` markdown heading."""
    headings: dict[int, str] = {}
    pending = None
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            for line in str(cell.source).splitlines():
                if line.startswith("## "):
                    pending = line[3:].strip()
        elif cell.cell_type == "code" and pending:
            headings[index] = pending
            pending = None
    return headings


def register_engine() -> None:
    """Register the papermill engine that prints section headings (idempotent)."""
    from papermill.engines import NBClientEngine, papermill_engines

    class LiveEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            headings = section_headings(nb_man.nb)
            original = nb_man.cell_start

            def cell_start(cell, cell_index=None, **more):
                if cell_index in headings and _printer:
                    tail, out = _printer[-1]
                    tail.drain()  # the previous section's last progress lines first
                    out(f"{INDENT}{headings[cell_index]}")
                return original(cell, cell_index, **more)

            nb_man.cell_start = cell_start
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register(ENGINE, LiveEngine)


class Tail:
    """Prints the events the kernel appends to ``path``; ``drain`` prints what has arrived so far (called by
    the poller every half second, and before a section heading so that lines keep their order)."""

    def __init__(self, path: Path, out: Printer) -> None:
        self.path, self.out = path, out
        self.position = 0
        self.lock = threading.Lock()

    def drain(self) -> None:
        with self.lock:
            try:
                with open(self.path, encoding="utf-8") as handle:
                    handle.seek(self.position)
                    chunk = handle.read()
            except FileNotFoundError:
                return
            complete, _, _ = chunk.rpartition("\n")
            if not complete:
                return
            self.position += len((complete + "\n").encode("utf-8"))
            for line in complete.splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.out(f"{INDENT}{INDENT}{event.get('text', '')}")

    def poll(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            self.drain()
        self.drain()


_printer: list[tuple[Tail, Printer]] = []  # the running stage's (papermill builds engines by class)


@contextlib.contextmanager
def live_stage(out: Printer, enabled: bool = True) -> Iterator[dict[str, Any]]:
    """While a stage runs: section headings and the kernel's progress lines go to ``out``. Yields the
    keyword arguments for ``papermill.execute_notebook`` (the IPC kernel manager in either case)."""
    if not enabled:
        yield {"kernel_manager_class": ipc_kernel_manager_class()}
        return
    register_engine()
    folder = Path(tempfile.mkdtemp(prefix="reflectevo-live-"))
    path = folder / "events.jsonl"
    path.touch()
    previous = os.environ.get(LIVE_ENV)
    os.environ[LIVE_ENV] = str(path)  # the kernel inherits the runner's environment
    stop = threading.Event()
    tail = Tail(path, out)
    thread = threading.Thread(target=tail.poll, args=(stop,), daemon=True)
    thread.start()
    _printer.append((tail, out))
    try:
        yield {"engine_name": ENGINE, "kernel_manager_class": ipc_kernel_manager_class()}
    finally:
        _printer.pop()
        stop.set()
        thread.join(timeout=5)
        if previous is None:
            os.environ.pop(LIVE_ENV, None)
        else:
            os.environ[LIVE_ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)


def headline(run_dir: Path) -> str | None:
    """Acc@t1 / Acc@t2 / Δ (%) over all tasks, per variant (rows) and protocol x grader (columns), from
    stage 05's summary.csv; None when the run has no evaluation."""
    import pandas as pd

    from reflectevo.evaluation.metrics import OVERALL, format_shares

    path = run_dir / "eval" / "summary.csv"
    if not path.is_file():
        return None
    summary = pd.read_csv(path)
    rows = summary[summary["task"] == OVERALL]
    if rows.empty:
        return None

    columns = list(dict.fromkeys(f"{r.protocol}/{r.grader}" for r in rows.itertuples()))
    variants = list(dict.fromkeys(rows["variant"]))
    table = {v: {c: "—" for c in columns} for v in variants}
    for r in rows.itertuples():
        table[r.variant][f"{r.protocol}/{r.grader}"] = format_shares(r.acc_t1, r.acc_t2, r.delta)
    width = max(len(v) for v in variants)
    widths = {c: max(len(c), *(len(table[v][c]) for v in variants)) for c in columns}
    lines = [" " * width + "  " + "  ".join(c.ljust(widths[c]) for c in columns)]
    lines += [v.ljust(width) + "  " + "  ".join(table[v][c].ljust(widths[c]) for c in columns) for v in variants]
    return "\n".join(lines)


def summary_lines(run_dir: Path, seconds: dict[str, float], skipped: list[str]) -> list[str]:
    lines = ["", "summary"]
    for key, value in seconds.items():
        lines.append(f"{INDENT}{key}: {value:.1f} s")
    for key in skipped:
        lines.append(f"{INDENT}{key}: skipped (finished earlier)")
    if seconds:
        lines.append(f"{INDENT}total: {sum(seconds.values()):.1f} s")
    table = headline(run_dir)
    if table:
        lines += ["", "Acc@t1 / Acc@t2 / Δ (%), all tasks (protocol/grader):", table]
    report = run_dir / "report.md"
    if report.is_file():
        lines += ["", f"report: {report}"]
    return lines
