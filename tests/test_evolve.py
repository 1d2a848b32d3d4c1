"""Self-evolution over rounds (``evolve``): two real rounds of the smoke recipe through ``reflectevo run``,
round addressing, the stopping rule (as a rule, and through the runner with small notebooks), the
generator merge, the data policies and the params checks.

The two-round run reuses the smoke run the notebook tests already made (``smoke_papermill_run``): round
1 of ``params/evolve-smoke.yaml`` has the smoke run's stage identities, so its stages 01-04 are adopted
and skipped, and stage 05 of round 1 finds its generations stored; what runs is round 1's validation
scoring, round 2 (the merge, 02-05) and stage 06.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from reflectevo.cli.run import run_pipeline
from reflectevo.config import load_params
from reflectevo.core.files import folder_sha256
from reflectevo.errors import ConfigError, ReflectEvoError, StageError
from reflectevo.evolve import generator_digest, stop_rule, training_data
from reflectevo.runs.plan import read_manifest
from reflectevo.runs.stages import for_round, round_seed

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EVOLVE_SMOKE = REPO / "params" / "evolve-smoke.yaml"


def adopt_as_round_1(plain: Path, run_dir: Path) -> None:
    """Lay a finished plain run (stages 01-05) out as round 1 of a run of several rounds: 01 at the top,
    02-04 (with their manifest entries) and 05's stored generations in ``round_1/``."""
    run_dir.mkdir(parents=True)
    round_dir = run_dir / "round_1"
    shutil.copytree(plain / "data", run_dir / "data")
    shutil.copytree(plain / "figures", run_dir / "figures")
    for folder in ("reflect", "sft", "dpo", "figures"):
        shutil.copytree(plain / folder, round_dir / folder)
    shutil.copytree(plain / "eval" / "generations", round_dir / "eval" / "generations")
    manifest = read_manifest(plain)
    stages = manifest.pop("stages")
    manifest.pop("events", None)
    (run_dir / "manifest.json").write_text(json.dumps({**manifest, "stages": {"01_data": stages["01_data"]}}))
    kept = {key: stages[key] for key in ("02_reflect", "03_sft", "04_dpo")}
    (round_dir / "manifest.json").write_text(json.dumps({**manifest, "stages": kept}))


@pytest.fixture(scope="module")
def evolve_run(smoke_papermill_run, tmp_path_factory):
    """A working directory where ``reflectevo run params/evolve-smoke.yaml`` ran both rounds; returns
    (cwd, stdout, seconds)."""
    cwd = tmp_path_factory.mktemp("evolve-smoke")
    adopt_as_round_1(smoke_papermill_run / "outputs" / "smoke", cwd / "outputs" / "evolve-smoke")
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "reflectevo"), "run", str(EVOLVE_SMOKE), "--notebooks", str(REPO / "notebooks")],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    return cwd, result.stdout, time.monotonic() - started


def test_two_rounds_of_the_smoke_recipe(evolve_run):
    cwd, stdout, seconds = evolve_run
    print(f"two rounds in {seconds:.0f} s")
    top = cwd / "outputs" / "evolve-smoke"
    # round 1 is the smoke run: its stages 01-04 were adopted, not rerun; everything else ran
    for key in ("01_data", "round_1:02_reflect", "round_1:03_sft", "round_1:04_dpo"):
        assert f"{key}: skipped, finished with the same params" in stdout, stdout
    for key in (
        "round_1:05_eval",
        "round_2:02_reflect",
        "round_2:03_sft",
        "round_2:04_dpo",
        "round_2:05_eval",
        "06_analysis",
    ):
        assert f"{key}: done" in stdout, stdout

    manifest = read_manifest(top)
    assert set(manifest["stages"]) == {"01_data", "06_analysis"}
    assert set(manifest["evolve"]["rounds"]) == {"round_1", "round_2"} and "stopped" not in manifest["evolve"]
    rounds = {number: read_manifest(top / f"round_{number}") for number in (1, 2)}
    for number, round_manifest in rounds.items():
        assert {key: entry["status"] for key, entry in round_manifest["stages"].items()} == dict.fromkeys(
            ("02_reflect", "03_sft", "04_dpo", "05_eval"), "done"
        )
        assert round_manifest["seeds"] == {"run": round_seed(0, number), "round": number}
        assert (top / f"round_{number}" / "eval" / "summary.csv").stat().st_size > 0  # the round's eval table
        validation = round_manifest["stages"]["05_eval"]["validation"]
        assert validation["split"] == "validation" and validation["generator"] in validation["scores"]
        scored = json.loads((top / f"round_{number}" / "eval" / "validation" / "results.json").read_text())
        assert scored["split"] == "validation" and scored["protocols"] == ["oracle_free"]
        assert manifest["evolve"]["rounds"][f"round_{number}"]["validation"] == validation
    assert round_seed(0, 2) != 0

    # round 2 generated with round 1's choice, merged: the recorded digest is the folder's
    generator = rounds[2]["stages"]["02_reflect"]["generator"]
    folder = cwd / generator["folder"]
    assert generator["variant"] == rounds[1]["stages"]["05_eval"]["validation"]["generator"]
    assert generator["digest"] == generator_digest(folder) == folder_sha256(folder, exclude=("generator.json",))
    assert generator["dtype"] == "float32"  # the CPU recipe's configured dtype
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file()
    assert rounds[2]["params"]["model"]["name"] == generator["folder"]
    assert rounds[2]["generation"]["02_reflect"]["model"] == generator["folder"]
    assert rounds[2]["stages"]["03_sft"]["base_model"] == generator["folder"]  # trained further

    # accumulate: round 2 trains on both rounds' rows, round 1 on its own
    from datasets import load_from_disk

    own = {
        number: {row["task"]: row for row in rounds[number]["stages"]["02_reflect"]["counts"]}["all"]
        for number in (1, 2)
    }
    data = rounds[2]["stages"]["02_reflect"]["training_data"]
    for name in ("d_plus", "d_pm", "d_pref"):
        assert data["rows"][name] == own[1][name] + own[2][name] - data["duplicates_dropped"][name]
        rows = [
            json.loads(line)
            for line in (top / "round_2" / "reflect" / "accumulated" / f"{name}.jsonl").read_text().splitlines()
        ]
        assert len(rows) == data["rows"][name] and {row["round"] for row in rows} <= {1, 2}
    assert load_from_disk(str(top / "round_2" / "reflect" / "datasets" / "dpo_d_pm")).num_rows == data["rows"]["d_pm"]
    assert load_from_disk(str(top / "round_1" / "reflect" / "datasets" / "dpo_d_pm")).num_rows == own[1]["d_pm"]

    # stage 06: the stability table has one row per round, and the report shows it
    report = (top / "report.md").read_text()
    section = report.split("## Self-evolution over rounds", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| round | generator | acc_t1 | acc_t2 |") and len(table) == 1 + 2
    assert table[2].startswith(f"| 2 | {generator['variant']} |")
    assert (top / "figures" / "06_stability.png").stat().st_size > 10_000


def test_stability_table_reads_every_round(evolve_run):
    from reflectevo.analysis import tables as analysis

    top = evolve_run[0] / "outputs" / "evolve-smoke"
    rounds = {number: analysis.read_round(top / f"round_{number}") for number in (1, 2)}
    table = analysis.stability_table(rounds, lambda text: len(text.split()), protocol="oracle_free", grader="official")
    assert list(table["round"]) == [1, 2] and list(table.columns) == analysis.STABILITY_COLUMNS
    for number, row in zip((1, 2), table.itertuples()):
        counts = {r["task"]: r for r in rounds[number]["counts"]}["all"]
        assert row.reflections == counts["reflections"] and row.d_plus == counts["d_plus"]
        assert row.d_plus_yield == pytest.approx(counts["d_plus"] / counts["reflections"], abs=1e-4)
        assert 0 <= row.acc_t1 <= 1 and 0 <= row.acc_t2 <= 1 and row.reflection_length > 0


def test_data_policies_on_the_run(evolve_run, tmp_path):
    """fresh keeps a round's own rows; accumulate drops a later round's row an earlier round already has."""
    cwd = evolve_run[0]
    params = load_params(
        EVOLVE_SMOKE,
        {"run": {"name": "evolve-smoke", "seed": 0, "allow_code_execution": True, "output_dir": str(cwd / "outputs")}},
    )
    round_1 = [
        json.loads(line)
        for line in (params.run_dir / "round_1" / "reflect" / "curated" / "d_plus.jsonl").read_text().splitlines()
    ]
    new = {**round_1[0], "reflections": round_1[0]["reflections"] + " (a new one)"}
    accumulated, summary, written = training_data(for_round(params, 2), tmp_path, [round_1[0], new], [], [])
    assert accumulated["d_plus"] == [{**row, "round": 1} for row in round_1] + [{**new, "round": 2}]
    assert summary["duplicates_dropped"]["d_plus"] == 1 and summary["by_round"]["d_plus"] == {
        "round_1": len(round_1),
        "round_2": 1,
    }
    assert [path.name for path in written] == ["d_plus.jsonl", "d_pm.jsonl", "d_pref.jsonl"]
    fresh = load_params(EVOLVE_SMOKE, {"evolve": {"rounds": 2, "data": "fresh"}})
    own, summary, written = training_data(for_round(fresh, 2), tmp_path, [round_1[0], new], [], [])
    assert own["d_plus"] == [round_1[0], new] and summary["policy"] == "fresh" and written == []


def test_round_addressing(evolve_run, monkeypatch):
    """--from round_2:03 reruns round 2 from 03 on (and 06), nothing of round 1; plain stage names mean
    every round; malformed or out-of-range addresses are refused before anything runs."""
    monkeypatch.chdir(evolve_run[0])

    def plan(**options) -> list[tuple[str, str]]:
        lines: list[str] = []
        assert run_pipeline(EVOLVE_SMOKE, dry_run=True, notebooks=REPO / "notebooks", out=lines.append, **options) == 0
        start = next(index for index, line in enumerate(lines) if line.strip() == "# stage plan") + 1
        end = next(index for index, line in enumerate(lines) if line.strip().startswith("# one rendered prompt"))
        return [tuple(line.split()[:2]) for line in lines[start:end]]

    assert plan(start="round_2:03", force=True) == [
        ("round_2:03_sft", "run"),
        ("round_2:04_dpo", "run"),
        ("round_2:05_eval", "run"),
        ("06_analysis", "run"),
    ]
    assert all(action == "skip" for _, action in plan(start="round_2:03"))
    assert plan(stages=["round_1:02", "round_2:05_eval"]) == [
        ("round_1:02_reflect", "skip"),
        ("round_2:05_eval", "skip"),
    ]
    assert [key for key, _ in plan(stages=["03"])] == ["round_1:03_sft", "round_2:03_sft"]
    assert [key for key, _ in plan(start="05")] == [
        "round_1:05_eval",
        "round_2:02_reflect",
        "round_2:03_sft",
        "round_2:04_dpo",
        "round_2:05_eval",
        "06_analysis",
    ]
    for address, message in (
        ("round_x:03", "malformed stage address"),
        ("round_3:03", r"outside 1\.\.2"),
        ("round_1:01", "runs once per run"),
        ("round_2:09", "unknown stage"),
    ):
        with pytest.raises(ReflectEvoError, match=message):
            plan(start=address)
    with pytest.raises(ReflectEvoError, match="one round"):
        run_pipeline(REPO / "params" / "smoke.yaml", start="round_1:03", dry_run=True, notebooks=REPO / "notebooks")


# ---- the stopping rule -----------------------------------------------------------------------------------
def test_stop_rule():
    evolve = load_params(None, {"evolve": {"rounds": 4, "stop_margin": 0.05}}).evolve
    assert stop_rule(evolve, {1: 0.5, 2: 0.6, 3: 0.62, 4: 0.9}).after_round == 3  # +0.02 < 0.05
    decision = stop_rule(evolve, {1: 0.5, 2: 0.55})  # exactly the margin: it goes on
    assert decision.after_round is None and decision.decided_through == 2
    assert stop_rule(evolve, {1: 0.5, 2: 0.4}).reason.startswith(
        "validation Acc@t2 (oracle_free) went from 0.5000 in round 1 to 0.4000 in round 2 (-0.1000)"
    )
    assert stop_rule(evolve, {1: 0.5, 3: 0.1}).decided_through == 1  # round 2 not current: nothing after it is decided
    # a round without a score (none of its variants has a second turn) is compared with nothing
    assert stop_rule(evolve, {1: 0.5, 2: None, 3: 0.4}).after_round is None
    never = load_params(None, {"evolve": {"rounds": 4}}).evolve
    assert stop_rule(never, {1: 0.9, 2: 0.1, 3: 0.0}).after_round is None


MINI_PARAMETERS = "params_file = None\nrun = {}\ndata = {}\nevolve = {}"
MINI_BODY = """
from reflectevo.notebook import configure, setup
setup()
params = configure(params_file, select_model_backend=False, run=run, data=data, evolve=evolve)
from reflectevo.core.files import atomic_write_text
from reflectevo.runs.stages import for_round
from reflectevo.runs.rundir import open_run
params = for_round(params)
rundir = open_run(params, params_file=params_file)
stage = rundir.begin_stage("{key}", require_upstream=False)
out = stage.dir / "{key}.txt"
atomic_write_text(out, "{key}")
extra = {{}}
if "{key}" == "05_eval":  # the validation score each round gets, as stage 05 records it
    extra["validation"] = {{"generator": "sft/two_stage", "score": {scores}[params.evolve.round], "protocol": "oracle_free"}}
stage.finish(outputs=[out], **extra)
rundir.close()
"""


def test_the_runner_stops_when_validation_stops_improving(tmp_path, monkeypatch):
    """Three rounds with small notebooks (05 and 06 only): the scores 0.25, 0.25, 0.75 stop the run after
    round 2; a rerun knows it before anything runs; without the margin round 3 and stage 06 run."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for key in ("05_eval", "06_analysis"):
        notebook = nbformat.v4.new_notebook()
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        parameters = nbformat.v4.new_code_cell(MINI_PARAMETERS)
        parameters.metadata["tags"] = ["parameters"]
        notebook.cells = [
            parameters,
            nbformat.v4.new_code_cell(MINI_BODY.format(key=key, scores={1: 0.25, 2: 0.25, 3: 0.75})),
        ]
        nbformat.write(notebook, notebooks / f"{key}.ipynb")
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"

    def run(**evolve) -> list[str]:
        recipe.write_text(
            yaml.safe_dump({"run": {"name": "r"}, "data": {"tasks": ["logiqa"]}, "evolve": {"rounds": 3, **evolve}})
        )
        lines: list[str] = []
        assert run_pipeline(recipe, notebooks=notebooks, out=lines.append) == 0, lines
        return lines

    lines = run(stop_margin=0.01)
    assert "[3/4] round_3:05_eval: skipped, the run stops after round 2 (evolve.stop_margin)" in lines, lines
    assert any(
        line.startswith("  stopping after round 2: validation Acc@t2 (oracle_free) went from 0.2500") for line in lines
    )
    assert "[4/4] 06_analysis: running (not run yet)" in lines
    manifest = read_manifest(tmp_path / "outputs" / "r")
    assert manifest["evolve"]["stopped"]["after_round"] == 2 and set(manifest["evolve"]["rounds"]) == {
        "round_1",
        "round_2",
    }
    assert not (tmp_path / "outputs" / "r" / "round_3").exists()

    lines = run(stop_margin=0.01)  # the rounds on disk decide it before anything runs
    assert [line.split(": ")[1].split(",")[0] for line in lines if line.startswith("[")] == ["skipped"] * 4, lines

    lines = run()  # no stopping rule: round 3 runs, and stage 06 now covers three rounds
    assert "[3/4] round_3:05_eval: running (not run yet)" in lines and "[4/4] 06_analysis: running" in " ".join(
        lines
    ), lines
    assert "stopped" not in read_manifest(tmp_path / "outputs" / "r")["evolve"]


# ---- params and round params ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("evolve", "message"),
    [
        ({"rounds": 0}, "evolve.rounds"),
        ({"rounds": 2, "generator": "sft/two_stag"}, "did you mean 'sft/two_stage'"),
        ({"rounds": 2, "generator": "dpo/d_pref"}, "which sft.modes / dpo.pairs do not train"),
        ({"rounds": 2, "protocol": "self_verify"}, "is not in eval.protocols"),
        ({"rounds": 2, "data": "all"}, "evolve.data"),
        ({"rounds": 1, "round": 1}, "only set in a run of several rounds"),
        ({"rounds": 2, "round": 3}, "beyond evolve.rounds"),
    ],
)
def test_bad_evolve_params_are_refused(evolve, message):
    with pytest.raises(ConfigError, match=message):
        load_params(None, {"evolve": evolve})


def test_the_runner_refuses_a_round_in_the_params_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"run": {"name": "r"}, "evolve": {"rounds": 2, "round": 2}}))
    with pytest.raises(ReflectEvoError, match="the runner sets it"):
        run_pipeline(recipe, dry_run=True, notebooks=REPO / "notebooks")


def test_round_params_and_identities():
    """Round 1 is the plain run (same identities for 02-04); round k >= 2 has its own seed, its merged
    generator as model, and identities that name the round and the generator."""
    from reflectevo.runs.plan import Address, address_identity, identity_of
    from reflectevo.runs.stages import STAGES

    params = load_params(EVOLVE_SMOKE)
    plain = load_params(REPO / "params" / "smoke.yaml")
    first, second = for_round(params, 1), for_round(params, 2)
    assert first.run_dir == Path("outputs/evolve-smoke/round_1") and first.model == params.model
    assert second.run.seed == round_seed(0, 2) and second.model.name == "outputs/evolve-smoke/round_2/generator"
    assert for_round(second, 1).run.seed == 0 and for_round(second, 2) is second
    upstream = {"01_data": "a", "02_reflect": "b"}
    for stage in STAGES[1:4]:
        assert address_identity(params, Address(stage, 1), upstream) == identity_of(plain, stage, upstream)
    other = load_params(EVOLVE_SMOKE, {"evolve": {"rounds": 2, "generator": "sft/two_stage"}})
    for stage in STAGES[1:5]:
        assert address_identity(params, Address(stage, 2), upstream) != address_identity(
            other, Address(stage, 2), upstream
        )
    with pytest.raises(StageError, match="not resolved"):
        from reflectevo.runs.rundir import open_run

        open_run(load_params(EVOLVE_SMOKE, {"evolve": {"rounds": 2, "round": 2}}))


@pytest.mark.parametrize(
    ("evolving", "base"), [("evolve-smoke.yaml", "smoke.yaml"), ("evolve-standin.yaml", "standin.yaml")]
)
def test_evolve_recipes_follow_their_base(evolving, base):
    """The evolve recipes are their base recipe plus the evolve section (so round 1 is the base run)."""
    evolved = load_params(REPO / "params" / evolving).to_dict()
    original = load_params(REPO / "params" / base).to_dict()
    assert evolved["evolve"]["rounds"] == 2
    for section in evolved:
        if section not in ("run", "evolve"):
            assert evolved[section] == original[section], section
    assert {**evolved["run"], "name": original["run"]["name"]} == original["run"]
