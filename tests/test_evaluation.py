"""Stage 05's evaluation logic: the variants and their roles, the checks made before any model loads,
the generation-store key, the self-verification gate and ``reflectevo eval`` with the real stand-in
model. (The metrics are tested in test_metrics.py; the notebook in test_notebooks.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reflectevo.config import load_params
from reflectevo.errors import ConfigError, EvaluationError
from reflectevo.evaluation.evaluator import evaluation_store_dir, make_evaluator
from reflectevo.evaluation.stage import format_example, slug
from reflectevo.evaluation.variants import ModelPool, make_variant, plan_variants, roles_table

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


def fake_reflection_phase_adapter(run_dir: Path) -> Path:
    folder = run_dir / "sft" / "two_stage" / "reflection_adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    return folder


def test_default_roles_follow_the_paper(tmp_path):
    params = smoke()
    fake_adapters(tmp_path, ["sft/one_stage", "sft/two_stage", "sft/qa_pairs", "dpo/d_pm", "dpo/d_pref"])
    fake_reflection_phase_adapter(tmp_path)
    manifest = {"stages": {"03_sft": {"status": "done"}, "04_dpo": {"status": "done"}}}
    variants = {v.name: v.roles() for v in plan_variants(params, tmp_path, manifest)}
    assert list(variants) == [
        "retry",
        "base",
        "sft/one_stage",
        "sft/two_stage",
        "sft/two_stage:reflection_phase",
        "sft/qa_pairs",
        "dpo/d_pm",
        "dpo/d_pref",
    ]
    assert variants["retry"] == {"first_turn": "base", "reflector": None, "second_turn": "base"}
    assert variants["base"] == {"first_turn": "base", "reflector": "base", "second_turn": "base"}
    assert variants["sft/one_stage"] == {
        "first_turn": "base",
        "reflector": "sft/one_stage",
        "second_turn": "sft/one_stage",
    }
    assert variants["sft/two_stage"] == {
        "first_turn": "base",
        "reflector": "sft/two_stage",
        "second_turn": "sft/two_stage",
    }
    # the same two-stage training, its reflection-phase adapter reflecting and its final adapter answering
    assert variants["sft/two_stage:reflection_phase"] == {
        "first_turn": "base",
        "reflector": "sft/two_stage:reflection_phase",
        "second_turn": "sft/two_stage",
    }
    assert variants["sft/qa_pairs"] == {"first_turn": "sft/qa_pairs", "reflector": None, "second_turn": None}
    assert variants["dpo/d_pm"] == {"first_turn": "base", "reflector": "dpo/d_pm", "second_turn": "base"}
    table = roles_table(plan_variants(params, tmp_path, manifest))
    assert table.loc["sft/one_stage", "second turn"].endswith("(in the reflection's output)")
    assert table.loc["sft/two_stage:reflection_phase", "adapter"].endswith("sft/two_stage/reflection_adapter")
    assert table.loc["sft/two_stage", "adapter"].endswith("sft/two_stage/adapter")


def test_which_two_stage_adapter_reflects_is_a_choice(tmp_path):
    from reflectevo.evaluation.variants import trained_variants

    fake_adapters(tmp_path, ["sft/two_stage"])
    manifest = {"stages": {"03_sft": {"status": "done"}}}
    sft = {"modes": ["two_stage"], "max_steps": 2}
    assert [
        trained_variants(smoke(sft=sft, eval={"two_stage_reflector": choice}))
        for choice in ("final", "reflection_phase", "both")
    ] == [
        ["sft/two_stage", "dpo/d_pm", "dpo/d_pref"],
        ["sft/two_stage:reflection_phase", "dpo/d_pm", "dpo/d_pref"],
        ["sft/two_stage", "sft/two_stage:reflection_phase", "dpo/d_pm", "dpo/d_pref"],
    ]
    assert [
        v.name for v in plan_variants(smoke(sft=sft, eval={"two_stage_reflector": "final"}), tmp_path, manifest)
    ] == ["retry", "base", "sft/two_stage"]
    # without the reflection phase's adapter the variant that needs it stops before any model loads
    with pytest.raises(
        EvaluationError, match=r"sft/two_stage:reflection_phase, but .*reflection_adapter holds no trained adapter"
    ):
        plan_variants(smoke(eval={"variants": ["base", "sft/two_stage:reflection_phase"]}), tmp_path, manifest)
    fake_reflection_phase_adapter(tmp_path)
    only = plan_variants(
        smoke(eval={"variants": ["sft/two_stage:reflection_phase"], "first_turn": "variant"}), tmp_path, manifest
    )
    (variant,) = only
    assert variant.reflector.adapter == tmp_path / "sft/two_stage/reflection_adapter"
    assert variant.first_turn.adapter == variant.second_turn.adapter == tmp_path / "sft/two_stage/adapter"
    with pytest.raises(ConfigError, match=r"sft/two_stage:reflection_phase.*which sft.modes / dpo.pairs do not train"):
        smoke(sft={"modes": ["one_stage"], "max_steps": 2}, eval={"variants": ["sft/two_stage:reflection_phase"]})


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
    fake_reflection_phase_adapter(tmp_path)
    only_sft = {"stages": {"03_sft": {"status": "done"}, "04_dpo": {"status": "failed"}}}
    assert [v.name for v in plan_variants(params, tmp_path, only_sft)] == [
        "retry",
        "base",
        "sft/one_stage",
        "sft/two_stage",
        "sft/two_stage:reflection_phase",
        "sft/qa_pairs",
    ]
    assert [v.name for v in plan_variants(params, tmp_path, {})] == ["retry", "base"]


def test_a_named_variant_that_was_not_trained_stops_before_any_model_loads(tmp_path):
    params = smoke(eval={"variants": ["base", "dpo/d_pm"]})
    with pytest.raises(EvaluationError, match=r"dpo/d_pm.*no trained adapter.*--from 04"):
        plan_variants(params, tmp_path, {})
    with pytest.raises(ConfigError, match="sft.modes / dpo.pairs do not train"):
        smoke(sft={"modes": ["one_stage"]}, eval={"variants": ["sft/two_stage"]})
    with pytest.raises(
        ConfigError, match=r"eval.protocols.0: Input should be 'oracle', 'oracle_free' or 'self_verify'"
    ):
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
    base = evaluation_store_dir(tmp_path, smoke(), manifest)
    assert (
        evaluation_store_dir(
            tmp_path,
            smoke(
                eval={
                    "bootstrap_samples": 7,
                    "graders": ["robust"],
                    "protocols": ["oracle"],
                    "allow_mismatch": ["grader"],
                }
            ),
            manifest,
        )
        == base
    )
    assert evaluation_store_dir(tmp_path, smoke(eval={"fewshots": 1, "allow_mismatch": ["fewshots"]}), manifest) != base
    assert (
        evaluation_store_dir(tmp_path, smoke(), {"stages": {**manifest["stages"], "03_sft": {"identity": "c"}}}) != base
    )


def test_slugs_name_models_and_adapters():
    assert slug("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama-Meta-Llama-3-8B-Instruct"
    assert slug("outputs/run/sft/two_stage/adapter") == "sft-two_stage"
    assert slug("builtin:tiny") == "builtin-tiny"


def test_self_verification_gates_the_review(tmp_path, tiny_model_dir):
    """With the real stand-in: under self_verify only answers the model itself did not call correct
    are reviewed, and its verdict text is kept with the prediction."""
    from reflectevo.data.prepare import prepare_data

    params = smoke(
        data={"source": "samples", "tasks": ["logiqa", "bigbench"], "max_items": {"test": 4}},
        eval={
            "variants": ["retry", "base"],
            "protocols": ["self_verify"],
            "fewshots": 0,
            "max_new_tokens": 48,
            "reflection_max_new_tokens": 48,
            "bootstrap_samples": 0,
        },
    )
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
        [
            str(BIN / "reflectevo"),
            "eval",
            str(REPO / "params" / "smoke.yaml"),
            "--variants",
            "retry",
            "--protocols",
            "oracle",
            "--out",
            str(tmp_path / "eval"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Prompt, w/o reflection" in result.stdout and "protocol oracle" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    # 8 test questions, under the oracle gated by each of the two graders
    assert len(rows) == 2 * 8 and {row["variant"] for row in rows} == {"retry"}
    assert sorted({row["gate_grader"] for row in rows}) == ["official", "robust"]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("manifest.json"))

    missing = subprocess.run(
        [str(BIN / "reflectevo"), "eval", str(REPO / "params" / "smoke.yaml"), "--adapter", str(tmp_path / "none")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert missing.returncode == 2 and "adapter folder not found" in missing.stderr


# ---- the oracle, once per grader: scripted answers where the two graders disagree ----------------------
class ScriptedEngine:
    """Answers by what the prompt asks: a first attempt, a reflection or a second attempt, each scripted per
    question; records every prompt it was asked, so a test can see what was generated twice."""

    name = "scripted"

    def __init__(self, first: dict[str, str], second: dict[str, str]) -> None:
        self.first, self.second = first, second
        self.asked: list[tuple[str, str]] = []  # (kind, user message)
        self.stages: list[str] = []  # the generation stores asked for, in order

    def generate(self, requests, settings, *, stage, store_dir=None, seed=None, force=False):
        from reflectevo.generation.requests import GenerationOutput
        from reflectevo.prompts import REFLECTION_HEADER, REFLECTION_INTRO, REVIEW_HEADER, REVIEW_INTRO

        outputs = []
        self.stages.append(stage)
        for request in requests:
            user = request.messages[0]["content"]
            question = next(key for key in self.first if f"Question: {key}" in user)
            if user.startswith((REFLECTION_INTRO, REVIEW_INTRO)):
                kind, text = "reflection", "The answer was not written the way the task asks. Write the letter alone."
            elif REFLECTION_HEADER in user or REVIEW_HEADER in user:
                kind, text = "second", self.second[question]
            else:
                kind, text = "first", self.first[question]
            self.asked.append((kind, user))
            outputs.append(
                GenerationOutput(
                    key=request.key,
                    sample=0,
                    text=text,
                    finish_reason="eos",
                    prompt=user,
                    settings=settings.to_dict(),
                    prompt_tokens=0,
                    new_tokens=0,
                    engine=self.name,
                    batch=0,
                    stage=stage,
                )
            )
        return outputs


class ScriptedPool:
    def __init__(self, engine: ScriptedEngine) -> None:
        self.engine = engine

    def prepare(self, refs) -> None:
        pass

    def describe(self) -> dict:
        return {"base": {"engine": self.engine.name}}

    def active(self, ref):
        import contextlib

        return contextlib.nullcontext(self.engine)


def disagreeing_items():
    """Three questions: one the official grader rejects and the robust one accepts (a bracketed letter), one
    both reject alike (a wrong letter), one the official MATH rule rejects and the robust one accepts ($...$)."""
    from reflectevo.tasks import Item
    from reflectevo.tasks.text import parse_options

    options = "Which holds?\nA.red\nB.blue\nC.green\nD.white"
    logiqa = [
        Item("logiqa", "1", f"Sky. {options}", "b", options=parse_options(options, 4)),
        Item("logiqa", "2", f"Grass. {options}", "c", options=parse_options(options, 4)),
    ]
    math = [Item("math", "1", "What is one half as a fraction?", "\\frac{1}{2}")]
    first = {
        "Sky. " + options: "Thought: The sky is blue.\nAction: Finish[(B)]",
        "Grass. " + options: "Thought: Grass is red.\nAction: Finish[A]",
        "What is one half as a fraction?": "Thought: One over two.\nAction: Finish<<<$\\frac{1}{2}$>>>",
    }
    # second attempts that are wrong under both graders: a right answer reflected on can only be broken
    second = {
        "Sky. " + options: "Thought: Maybe green.\nAction: Finish[C]",
        "Grass. " + options: "Thought: My previous answer Finish[A] was wrong; grass is green.\nAction: Finish[C]",
        "What is one half as a fraction?": "Thought: Try again.\nAction: Finish<<<2>>>",
    }
    return {"logiqa": logiqa, "math": math}, first, second


def test_the_oracle_runs_once_per_grader_gated_and_scored_by_it(tmp_path):
    """Where the graders disagree on a first answer, each oracle run reflects on what its own grader rejected,
    so no oracle table shows a right answer turned wrong; the table of the other protocol is scored by every
    grader. A question both graders reject with the same feedback is reflected on and answered once."""
    from reflectevo.evaluation.evaluator import Evaluator, protocol_runs
    from reflectevo.evaluation.stage import compute_tables

    params = smoke(
        data={"source": "samples", "tasks": ["logiqa", "math"]},
        eval={"variants": ["base"], "protocols": ["oracle", "oracle_free"], "bootstrap_samples": 0},
    )
    items, first, second = disagreeing_items()
    engine = ScriptedEngine(first, second)
    evaluator = Evaluator(params, ScriptedPool(engine), tmp_path / "generations")
    predictions = evaluator.run([make_variant(params, "base")], items)
    assert protocol_runs(params) == [("oracle", "official"), ("oracle", "robust"), ("oracle_free", None)]
    assert len(predictions) == 3 * 3

    oracle = {(row["gate_grader"], row["task"], row["id"]): row for row in predictions if row["protocol"] == "oracle"}
    assert oracle[("official", "logiqa", "1")]["reflected"] and not oracle[("robust", "logiqa", "1")]["reflected"]
    assert oracle[("official", "math", "1")]["reflected"] and not oracle[("robust", "math", "1")]["reflected"]
    assert oracle[("official", "logiqa", "2")]["reflected"] and oracle[("robust", "logiqa", "2")]["reflected"]
    # the second attempt quotes the rejected answer in its thought; the action is what is graded
    assert oracle[("robust", "logiqa", "2")]["t2"]["official"]["extracted"] == "C"

    summary = compute_tables(predictions, params).summary
    overall = summary[summary["task"] == "overall"].set_index(["protocol", "grader"])
    # official: every first answer rejected, the grass one fixed; robust: two first answers accepted and kept
    assert overall.loc[("oracle", "official"), "acc_t1"] == 0
    assert overall.loc[("oracle", "official"), "acc_t2"] == pytest.approx(1 / 3)
    assert overall.loc[("oracle", "robust"), "acc_t1"] == pytest.approx(2 / 3)
    assert overall.loc[("oracle", "robust"), "acc_t2"] == 1
    assert (summary.loc[summary["protocol"] == "oracle", "right_to_wrong"] == 0).all()
    assert (summary.loc[summary["protocol"] == "oracle", "delta"] >= 0).all()
    # without the oracle every answer is reviewed, and the two right answers (under robust) are broken
    assert overall.loc[("oracle_free", "robust"), "right_to_wrong"] == 2
    assert set(summary.loc[summary["protocol"] == "oracle_free", "grader"]) == {"official", "robust"}

    # LogiQA 2 is rejected alike by both graders, with the same feedback: one reflection, one second attempt
    oracle_reflections = [user for kind, user in engine.asked if kind == "reflection" and "Answer is INCORRECT" in user]
    assert sum("Grass." in user for user in oracle_reflections) == 1
    assert sum("Sky." in user for user in oracle_reflections) == 1  # only the official run reflected on it
    # robust's run needed no generation of its own: its one reflected question was asked alike by the official run
    assert engine.stages == [
        "first_turn_base",
        "base_oracle-official_reflection",
        "base_oracle-official_second_turn",
        "base_oracle_free_reflection",
        "base_oracle_free_second_turn",
    ]


@pytest.mark.parametrize("prefill", ["action", "answer"])
def test_two_call_attempts_in_the_evaluation(tmp_path, prefill):
    """eval.attempt_calls: 2 makes each attempt as the paper's agent does: a thought call that stops at the
    action, then the action call with the thought given; the graded text is the two joined. With
    attempt_prefill: answer the action call starts at "Action: Finish[" and the model writes the rest."""
    from reflectevo.evaluation.evaluator import Evaluator
    from reflectevo.prompts import ACTION_PREFIX, THOUGHT_PREFIX

    class TwoCalls(ScriptedEngine):
        def generate(self, requests, settings, *, stage, store_dir=None, seed=None, force=False):
            from reflectevo.generation.requests import GenerationOutput

            outputs = []
            for request in requests:
                last = request.messages[-1]
                assert last["role"] == "assistant"
                opening = {"action": "", "answer": " Finish["}[prefill]
                text = "The sky is blue." if last["content"] == THOUGHT_PREFIX else ("B]" if opening else "Finish[B]")
                assert last["content"] == THOUGHT_PREFIX or last["content"].endswith(ACTION_PREFIX + opening)
                self.asked.append((stage, last["content"]))
                outputs.append(
                    GenerationOutput(
                        key=request.key,
                        sample=0,
                        text=text,
                        finish_reason="eos",
                        prompt="",
                        settings=settings.to_dict(),
                        prompt_tokens=0,
                        new_tokens=0,
                        engine=self.name,
                        batch=0,
                        stage=stage,
                    )
                )
            return outputs

    params = smoke(
        data={"source": "samples", "tasks": ["logiqa"]},
        reflect={"fewshots": 0, "attempt_calls": 2, "attempt_prefill": prefill},
        eval={
            "variants": ["retry"],
            "protocols": ["oracle"],
            "attempt_calls": 2,
            "attempt_prefill": prefill,
            "graders": ["official"],
            "bootstrap_samples": 0,
        },
    )
    items, first, second = disagreeing_items()
    engine = TwoCalls(first, second)
    predictions = Evaluator(params, ScriptedPool(engine), None).run(
        [make_variant(params, "retry")], {"logiqa": items["logiqa"]}
    )
    assert {row["t1"]["text"] for row in predictions} == {"Thought: The sky is blue.\nAction: Finish[B]"}
    assert list(dict.fromkeys(stage for stage, _ in engine.asked)) == [
        "first_turn_base_thought",
        "first_turn_base_action",
        "retry_oracle-official_second_turn_thought",
        "retry_oracle-official_second_turn_action",
    ]
    outcomes = {row["id"]: row["t1"]["official"]["outcome"] for row in predictions}
    assert outcomes == {"1": "correct", "2": "wrong"}


def test_training_and_test_settings_must_agree_unless_the_recipe_says_so():
    with pytest.raises(ConfigError, match=r"reflect.fewshots is 0, eval.fewshots is 3.*eval.allow_mismatch"):
        smoke(eval={"fewshots": 3})
    with pytest.raises(
        ConfigError, match=r"reflect.second_trial is 'reflection_and_attempt', eval.second_trial is 'reflection'"
    ):
        smoke(eval={"second_trial": "reflection"})
    with pytest.raises(ConfigError, match=r"reflect.attempt_calls is 1, eval.attempt_calls is 2"):
        smoke(eval={"attempt_calls": 2})
    with pytest.raises(ConfigError, match=r"reflect.attempt_prefill is 'action', eval.attempt_prefill is 'answer'"):
        smoke(reflect={"fewshots": 0, "attempt_calls": 2}, eval={"attempt_calls": 2, "attempt_prefill": "answer"})
    with pytest.raises(ConfigError, match=r"attempt_prefill 'answer' pre-fills call 2 .*set attempt_calls: 2"):
        smoke(reflect={"fewshots": 0, "attempt_prefill": "answer"})
    with pytest.raises(
        ConfigError, match=r"reflect.grader is 'official', which eval.graders \['robust'\] does not include"
    ):
        smoke(eval={"graders": ["robust"]})
    allowed = smoke(eval={"fewshots": 3, "graders": ["robust"], "allow_mismatch": ["fewshots", "grader"]})
    from reflectevo.config import training_test_mismatches

    assert training_test_mismatches(allowed) == {}
    assert set(training_test_mismatches(allowed, allowed=True)) == {"fewshots", "grader"}
    with pytest.raises(ConfigError, match=r"gate_grader was removed.*once per grader"):
        smoke(eval={"gate_grader": "robust"})
    # left unset, the evaluation asks as the training inputs were asked
    followed = load_params(None, {"reflect": {"fewshots": 1, "second_trial": "reflection", "attempt_calls": 2}})
    assert (followed.eval.fewshots, followed.eval.second_trial, followed.eval.attempt_calls) == (1, "reflection", 2)
    assert load_params(None, followed.to_dict()).hash() == followed.hash()


def test_a_task_left_out_of_evaluation_is_named_in_every_table(tmp_path):
    """data.allow_empty_eval lets a task without eval items be left out; the overall rows, the paper-layout
    tables, results.json and the report's provenance say so."""
    from reflectevo.analysis.report import provenance
    from reflectevo.evaluation.evaluator import Evaluator
    from reflectevo.evaluation.stage import compute_tables, eval_record, write_results

    params = smoke(
        data={"source": "samples", "tasks": ["logiqa", "math", "bigbench"], "allow_empty_eval": ["bigbench"]},
        eval={"variants": ["base"], "protocols": ["oracle"], "bootstrap_samples": 0},
    )
    items, first, second = disagreeing_items()
    variants = [make_variant(params, "base")]
    predictions = Evaluator(params, ScriptedPool(ScriptedEngine(first, second)), None).run(variants, items)
    tables = compute_tables(predictions, params, excluded_tasks=["bigbench"])
    overall = tables.summary[tables.summary["task"] == "overall"]
    assert len(overall) and set(overall["tasks_left_out"]) == {"bigbench"}
    assert set(tables.summary.loc[tables.summary["task"] != "overall", "tasks_left_out"]) == {""}
    record = eval_record(params, variants, items, excluded_tasks=["bigbench"])
    write_results(tmp_path, predictions, tables, record)
    assert (
        "Left out, with no test items (data.allow_empty_eval): bigbench."
        in (tmp_path / "paper_table_oracle_official.md").read_text()
    )
    assert json.loads((tmp_path / "results.json").read_text())["excluded_tasks"] == ["bigbench"]
    assert "left out with no test items: bigbench" in provenance(record, "builtin:tiny")


def test_a_prediction_records_when_the_robust_grader_read_an_answer_without_an_action_line():
    from reflectevo.evaluation.evaluator import Turn
    from reflectevo.tasks import get_task

    item = get_task("logiqa").load_samples("test")[0]
    rambling = f"Thought: I am fairly sure. Finish[{item.gold.upper()}] is my answer, I think, because"  # no Action:
    turn = Turn(rambling, get_task("logiqa").grade_both(item, rambling))
    row = turn.to_dict(["official", "robust"])
    assert row["official"] == {"outcome": "parse_failure", "extracted": None}
    assert row["robust"]["outcome"] == "correct" and row["robust"]["fallback"] == "whole_text"
