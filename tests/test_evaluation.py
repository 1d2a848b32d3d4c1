"""Stage 05's evaluation logic: the variants and their roles, the checks made before any model loads,
the generation-store key, the self-verification gate and ``reflectevo eval`` with the real stand-in
model. (The metrics are tested in test_metrics.py; the notebook in test_notebooks.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reflectevo.config import ConfigError, load_params
from reflectevo.evaluation import (
    EvaluationError,
    ModelPool,
    format_example,
    generations_dir,
    make_evaluator,
    make_variant,
    plan_variants,
    roles_table,
    slug,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def fake_adapters(run_dir: Path, names: list[str]) -> None:
    for name in names:
        folder = run_dir / name / "adapter"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")


def smoke(**sections):
    """params/smoke.yaml; an ``eval`` given here changes only the keys it names (other sections are replaced whole)."""
    if "eval" in sections:
        sections["eval"] = {**load_params(REPO / "params" / "smoke.yaml").eval.model_dump(), **sections["eval"]}
    return load_params(REPO / "params" / "smoke.yaml", sections)


def test_default_roles_follow_the_paper(tmp_path):
    params = smoke()
    fake_adapters(tmp_path, ["sft/one_stage", "sft/two_stage", "sft/qa_pairs", "dpo/d_pm", "dpo/d_pref"])
    manifest = {"stages": {"03_sft": {"status": "done"}, "04_dpo": {"status": "done"}}}
    variants = {v.name: v.roles() for v in plan_variants(params, tmp_path, manifest)}
    assert list(variants) == ["retry", "base", "sft/one_stage", "sft/two_stage", "sft/qa_pairs", "dpo/d_pm", "dpo/d_pref"]
    assert variants["retry"] == {"first_turn": "base", "reflector": None, "second_turn": "base"}
    assert variants["base"] == {"first_turn": "base", "reflector": "base", "second_turn": "base"}
    assert variants["sft/one_stage"] == {"first_turn": "base", "reflector": "sft/one_stage", "second_turn": "sft/one_stage"}
    assert variants["sft/two_stage"] == {"first_turn": "base", "reflector": "sft/two_stage", "second_turn": "sft/two_stage"}
    assert variants["sft/qa_pairs"] == {"first_turn": "sft/qa_pairs", "reflector": None, "second_turn": None}
    assert variants["dpo/d_pm"] == {"first_turn": "base", "reflector": "dpo/d_pm", "second_turn": "base"}
    table = roles_table(plan_variants(params, tmp_path, manifest))
    assert table.loc["sft/one_stage", "second turn"].endswith("(in the reflection's output)")


def test_roles_are_configurable(tmp_path):
    params = smoke(eval={"first_turn": "variant", "second_turn_after_sft": "base", "second_turn_after_dpo": "variant"})
    fake_adapters(tmp_path, ["sft/two_stage", "dpo/d_pm"])
    two_stage = make_variant(params, "sft/two_stage", tmp_path / "sft/two_stage/adapter")
    dpo = make_variant(params, "dpo/d_pm", tmp_path / "dpo/d_pm/adapter")
    assert two_stage.roles() == {"first_turn": "sft/two_stage", "reflector": "sft/two_stage", "second_turn": "base"}
    assert dpo.roles() == {"first_turn": "dpo/d_pm", "reflector": "dpo/d_pm", "second_turn": "dpo/d_pm"}


def test_trained_means_what_this_run_trained(tmp_path):
    params = smoke()
    fake_adapters(tmp_path, ["sft/one_stage", "sft/two_stage", "sft/qa_pairs"])
    only_sft = {"stages": {"03_sft": {"status": "done"}, "04_dpo": {"status": "failed"}}}
    assert [v.name for v in plan_variants(params, tmp_path, only_sft)] == [
        "retry", "base", "sft/one_stage", "sft/two_stage", "sft/qa_pairs"]
    assert [v.name for v in plan_variants(params, tmp_path, {})] == ["retry", "base"]


def test_a_named_variant_that_was_not_trained_stops_before_any_model_loads(tmp_path):
    params = smoke(eval={"variants": ["base", "dpo/d_pm"]})
    with pytest.raises(EvaluationError, match=r"dpo/d_pm.*no trained adapter.*--from 04"):
        plan_variants(params, tmp_path, {})
    with pytest.raises(ConfigError, match="sft.modes / dpo.pairs do not train"):
        smoke(sft={"modes": ["one_stage"]}, eval={"variants": ["sft/two_stage"]})
    with pytest.raises(ConfigError, match=r"eval.protocols.0: Input should be 'oracle', 'oracle_free' or 'self_verify'"):
        smoke(eval={"protocols": ["oracle_fre"]})


def test_engines_that_cannot_switch_adapters_are_refused():
    for engine in ("vllm", "replay"):
        generation = {"engine": engine, **({"replay_from": "x.jsonl"} if engine == "replay" else {})}
        with pytest.raises(EvaluationError, match="switches LoRA adapters"):
            ModelPool(smoke(generation=generation))
    model = {**smoke().model.model_dump(), "adapter": "some/adapter"}
    with pytest.raises(EvaluationError, match="model.adapter is set"):
        ModelPool(smoke(model=model))


def test_metric_settings_reuse_the_generations_and_prompt_settings_do_not(tmp_path):
    manifest = {"stages": {"01_data": {"identity": "a"}, "03_sft": {"identity": "b"}}}
    base = generations_dir(tmp_path, smoke(), manifest)
    assert generations_dir(tmp_path, smoke(eval={"bootstrap_samples": 7, "graders": ["robust"], "protocols": ["oracle"]}), manifest) == base
    assert generations_dir(tmp_path, smoke(eval={"fewshots": 1}), manifest) != base
    assert generations_dir(tmp_path, smoke(), {"stages": {**manifest["stages"], "03_sft": {"identity": "c"}}}) != base


def test_slugs_name_models_and_adapters():
    assert slug("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama-Meta-Llama-3-8B-Instruct"
    assert slug("outputs/run/sft/two_stage/adapter") == "sft-two_stage"
    assert slug("builtin:tiny") == "builtin-tiny"


def test_self_verification_gates_the_review(tmp_path, tiny_model_dir):
    """With the real stand-in: under self_verify only answers the model itself did not call correct
    are reviewed, and its verdict text is kept with the prediction."""
    from reflectevo.data.prepare import prepare_data

    params = smoke(data={"source": "samples", "tasks": ["logiqa", "bigbench"], "max_items": {"test": 4}},
                   eval={"variants": ["retry", "base"], "protocols": ["self_verify"], "fewshots": 0,
                         "max_new_tokens": 48, "reflection_max_new_tokens": 48, "bootstrap_samples": 0})
    items = {task: data.splits["test"] for task, data in prepare_data(params.data, params.run.seed).items()}
    evaluator = make_evaluator(params, tmp_path / "generations", progress=False)
    variants = [make_variant(params, "retry"), make_variant(params, "base")]
    predictions = evaluator.run(variants, items)
    assert len(predictions) == 2 * 8
    for row in predictions:
        assert row["gate"]["by"] == "self_verify" and row["gate"]["self_verify_text"] is not None
        assert row["reflected"] == (row["gate"]["self_verdict"] != "correct")
        assert (row["t2"] is None) == (not row["reflected"])
        standing = row["t2"] if row["reflected"] else row["t1"]
        assert row["final"] == {grader: standing[grader]["outcome"] for grader in ("official", "robust")}
    assert "protocol self_verify" in format_example([row for row in predictions if row["variant"] == "base"][:1])
    # the first turn was generated once, for both variants
    assert len(list((tmp_path / "generations" / "first_turn").rglob("*.jsonl"))) >= 1
    assert "first_turn/base" in evaluator.seconds and len(evaluator.first_turns) == 1


def test_reflectevo_eval_evaluates_a_model_without_the_pipeline(tmp_path, tiny_model_dir):
    result = subprocess.run(
        [str(BIN / "reflectevo"), "eval", str(REPO / "params" / "smoke.yaml"), "--variants", "retry",
         "--protocols", "oracle", "--out", str(tmp_path / "eval")],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Prompt, w/o reflection" in result.stdout and "protocol oracle" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {row["variant"] for row in rows} == {"retry"}
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("manifest.json"))

    missing = subprocess.run([str(BIN / "reflectevo"), "eval", str(REPO / "params" / "smoke.yaml"), "--adapter", str(tmp_path / "none")],
                             cwd=tmp_path, capture_output=True, text=True, check=False, timeout=120)
    assert missing.returncode == 2 and "adapter folder not found" in missing.stderr
