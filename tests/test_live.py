"""What `reflectevo run` prints while stages run, read from a subprocess as a user's terminal would show it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from reflectevo.cli.live import headline, section_headings

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WARNING = "without encryption"


def reflectevo_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(BIN / "reflectevo"),
            "run",
            str(REPO / "params" / "smoke.yaml"),
            "--notebooks",
            str(REPO / "notebooks"),
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )


@pytest.fixture(scope="module")
def live_run(smoke_papermill_run, tmp_path_factory):
    """Stages 03, 05 and 06 of a copy of the smoke run rerun (--force) by the CLI: stage 03 trains one-stage
    SFT again (its phase folder removed; the other variants are read back), stage 05 generates the `retry`
    variant's turns again (its stored batches removed; the others come from the store)."""
    cwd = tmp_path_factory.mktemp("live")
    run_dir = cwd / "outputs" / "smoke"
    shutil.copytree(smoke_papermill_run / "outputs" / "smoke", run_dir, ignore=shutil.ignore_patterns(".lock*"))
    for folder in [
        *(run_dir / "eval" / "generations").glob("*/retry"),
        *(run_dir / "sft" / "one_stage").glob("train-*"),
    ]:
        shutil.rmtree(folder)
    done = reflectevo_run("--stages", "03,05,06", "--force", cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return cwd, done


def test_sections_progress_and_summary_reach_the_terminal(live_run):
    cwd, done = live_run
    out = done.stdout
    # each stage's sections, in the notebook's order, under the stage's own line
    for notebook, stage in (("03_sft", "03_sft"), ("05_eval", "05_eval")):
        nb = nbformat.read(REPO / "notebooks" / f"{notebook}.ipynb", as_version=4)
        headings = list(section_headings(nb).values())
        start = out.index(f"{stage}: running")
        positions = [out.index(f"\n    {heading}\n", start) for heading in headings]
        assert positions == sorted(positions), f"{stage}: sections out of order"
        assert positions[-1] < out.index(f"{stage}: done", start)
    # training steps with their loss, from inside the kernel
    assert re.search(r"\n        train sft one_stage, \w+: step \d+/2, loss \d+\.\d{4}", out), out
    # the regenerated variant's generation, with tokens/s; and what the store gave back
    assert re.search(r"\n        generate [\w/-]+: \d+/\d+ sequences \(100%, \d+ s\), \d+ tokens/s", out), out
    assert "resumed from the store" in out
    # the summary: seconds per stage, the headline table, report.md
    summary = out[out.index("\nsummary\n") :]
    for stage in ("03_sft", "05_eval", "06_analysis"):
        assert re.search(rf"\n    {stage}: \d+\.\d s", summary)
    assert "Acc@t1 / Acc@t2 / Δ (%), all tasks" in summary and headline(cwd / "outputs" / "smoke") in summary
    assert summary.rstrip().endswith(str(Path("outputs") / "smoke" / "report.md"))
    # the kernels ran over IPC sockets: no transport warning, and no socket files left in the working directory
    assert WARNING not in done.stdout + done.stderr
    assert not list(cwd.glob("kernel-ipc*"))
    # the notebook still records everything: the executed 03 keeps the trainer's own output
    executed = nbformat.read(cwd / "outputs" / "smoke" / "notebooks" / "03_sft.ipynb", as_version=4)
    assert any(cell.get("outputs") for cell in executed.cells if cell.cell_type == "code")


def test_quiet_keeps_one_line_per_stage(live_run):
    cwd, _ = live_run
    done = reflectevo_run("--stages", "06", "--force", "--quiet", cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert not any(line.startswith("    ") for line in lines), lines
    assert "summary" not in lines and lines[-1].startswith("run 'smoke' complete")
    assert WARNING not in done.stdout + done.stderr


def test_headline_table_reads_summary(live_run):
    cwd, _ = live_run
    table = headline(cwd / "outputs" / "smoke").splitlines()
    variants = [line.split()[0] for line in table[1:]]
    assert "base" in variants and "retry" in variants
    assert "oracle/official" in table[0] and "oracle_free/robust" in table[0]
    assert headline(cwd / "nowhere") is None
