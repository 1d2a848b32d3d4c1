"""Self-evolution over rounds: what links round k to round k+1 (``evolve`` in the params).

With ``evolve.rounds: N`` (N >= 2) ``reflectevo run`` runs stage 01 once, then stages 02-05 once per
round into ``outputs/<run>/round_<k>/``, then stage 06 over every round (the layout and the stage
identities are in :mod:`reflectevo.runs`). This module holds the links between rounds, each called
from one notebook:

    validation_items(params, rundir)          # 05: the validation questions, checked before any generation
    validation_eval(params, rundir, ...)       # 05: every trained variant scored on validation -> the generator
    prepare_generator(params, rundir)          # 02 of round k+1: that variant merged into round_<k+1>/generator/
    training_data(params, d_plus, d_pm, ...)   # 02: this round's sets, or rounds 1..k de-duplicated
    stop_rule(params.evolve, scores)           # reflectevo run, after each round's 05

**The generator.** After round k's stage 05, ``evolve.generator`` names the variant that generates
round k+1: ``best_on_validation`` is the trained variant (an SFT mode or DPO pair type of that round)
with the highest Acc@t2 on the *validation* split, overall, under ``evolve.protocol`` and the first
reported grader (the test split never chooses anything); or an explicit name (``sft/two_stage``,
``dpo/d_pm``). Stage 02 of round k+1 merges that LoRA adapter into the weights it was trained on (the
round's model; for DPO started from an SFT variant, that merged SFT model) with PEFT's
``merge_and_unload``, in the model's configured dtype (16-bit on a GPU; a 4-bit recipe merges in
bfloat16, never into 4-bit weights; ``float32`` on a CPU recipe), and saves it with its tokenizer into
``round_<k+1>/generator/`` through a temporary folder renamed into place. That merged model is round
k+1's ``model``: it generates the round's reflections, its trained variants start from it (the
paper's self-evolution trains the improved model further) and stage 05 evaluates it as the round's
``base``. Round k+1's manifest records the variant, its validation score and the folder's digest.

**The data.** ``evolve.data: fresh`` trains round k on what round k generated; ``accumulate`` on the
union of rounds 1..k. A row of a later round is dropped when an earlier round already has a row with
the same training text (task, item id, the failed attempt and its feedback, and the reflection and
corrected attempt, or the chosen and rejected reflections); within one round rows are kept as curated,
so round 1 is exactly the plain run.

**Stopping.** With ``evolve.stop_margin`` set, the run stops after round k (k >= 2) when the validation
Acc@t2 of round k's generator choice rose by less than the margin over round k-1's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reflectevo.config import TWO_STAGE_REFLECTION_PHASE, EvolveParams, Params
from reflectevo.core.files import atomic_write_json, file_sha256, folder_sha256
from reflectevo.core.jsonl import read_jsonl, write_jsonl_atomic
from reflectevo.errors import EvolveError
from reflectevo.evaluation.evaluator import Evaluator, evaluation_store_dir
from reflectevo.evaluation.stage import compute_tables, eval_record, write_results
from reflectevo.evaluation.variants import dpo_base_model, finished_variants, plan_variants
from reflectevo.reflection.pipeline import load_items
from reflectevo.runs.plan import read_manifest
from reflectevo.runs.rundir import RunDir
from reflectevo.runs.stages import for_round, generator_dir
from reflectevo.training.adapters import dpo_start, merge_adapter

CURATED_SETS = ("d_plus", "d_pm", "d_pref")
GENERATOR_RECORD = "generator.json"  # in round_<k>/generator/: where the merged model came from, and its digest


# ---- the generator: chosen on validation by stage 05, merged by stage 02 of the next round --------
def trained_finished(params: Params, manifest: Mapping[str, Any]) -> list[str]:
    """The trained variants of this round that stage 05 evaluates (its variant list, finished stages only)."""

    # two-stage SFT with its reflection-phase reflector is the same adapters in other roles, not a model of its
    # own to merge into the next round's generator
    names = [name for name in finished_variants(params, dict(manifest)) if name != TWO_STAGE_REFLECTION_PHASE]
    return names if params.eval.variants == "trained" else [name for name in names if name in params.eval.variants]


def validation_items(params: Params, rundir: RunDir) -> dict[str, list[Any]] | None:
    """The validation questions the round's variants are scored on (None outside a run of several rounds);
    an empty validation split is an error here, before stage 05 generates anything."""
    if not params.evolve.round:
        return None

    items = load_items(rundir.stage_dir("01_data"), params.data.tasks, "validation")
    if not any(items.values()):
        raise EvolveError(
            "several rounds choose each round's generator on the validation split, which is empty; "
            "give data.max_items.validation a positive size (or data.split_fractions.validation a share)"
        )
    return items


def validation_scores(summary: Any, protocol: str, grader: str, variants: Sequence[str]) -> dict[str, float | None]:
    """Acc@t2 over all tasks (``overall``) of each variant, under one protocol and grader; None when the
    variant has no second turn (sft/qa_pairs) or was not evaluated."""
    rows = summary[(summary["protocol"] == protocol) & (summary["grader"] == grader) & (summary["task"] == "overall")]
    scores: dict[str, float | None] = {}
    for name in variants:
        values = rows.loc[rows["variant"] == name, "acc_t2"].astype(float)
        scores[name] = None if values.empty or math.isnan(values.iloc[0]) else round(float(values.iloc[0]), 6)
    return scores


def choose_generator(evolve: EvolveParams, scores: Mapping[str, float | None]) -> str | None:
    """The variant that generates the next round: the named one, or the best validation Acc@t2 (ties: the
    first in training order); None when no trained variant has a score."""
    if evolve.generator != "best_on_validation":
        return evolve.generator
    scored = [(score, -index, name) for index, (name, score) in enumerate(scores.items()) if score is not None]
    return max(scored)[2] if scored else None


def validation_eval(
    params: Params, rundir: RunDir, stage_dir: Path, evaluator: Any, tables: Any, items: dict[str, list[Any]] | None
) -> tuple[dict[str, Any] | None, list[Path]]:
    """Score this round's trained variants on the validation split under ``evolve.protocol`` (the stage's
    loaded models are reused) and choose the next round's generator. Writes the usual result files into
    ``eval/validation/`` (unless ``eval.split`` is already validation with that protocol, whose tables
    are used). Returns the record for the stage's manifest entry and the files written; (None, [])
    outside a run of several rounds."""
    if not params.evolve.round:
        return None, []

    protocol, grader = params.evolve.protocol, params.eval.graders[0]
    manifest = rundir.manifest()
    trained = trained_finished(params, manifest)
    written: list[Path] = []
    if params.eval.split == "validation" and protocol in params.eval.protocols:
        summary = tables.summary
    elif trained:
        update = {"split": "validation", "protocols": [protocol], "variants": trained}
        scoring = params.model_copy(update={"eval": params.eval.model_copy(update=update)})
        variants = plan_variants(scoring, scoring.run_dir, manifest, dpo_base=dpo_base_model(scoring, rundir))
        store = evaluation_store_dir(stage_dir / "validation", scoring, manifest)
        scorer = Evaluator(scoring, evaluator.pool, store, sandbox=evaluator.sandbox)
        predictions = scorer.run(variants, items or {})
        scored = compute_tables(predictions, scoring)
        written = write_results(
            stage_dir / "validation", predictions, scored, eval_record(scoring, variants, items or {}, scorer)
        )
        summary = scored.summary
    else:
        summary = None
    scores = validation_scores(summary, protocol, grader, trained) if summary is not None else {}
    chosen = choose_generator(params.evolve, scores)
    record = {
        "split": "validation",
        "protocol": protocol,
        "grader": grader,
        "items": {task: len(rows) for task, rows in (items or {}).items()},
        "scores": scores,
        "selection": params.evolve.generator,
        "generator": chosen,
        "score": scores.get(chosen) if chosen else None,
    }
    return record, written


def prepare_generator(params: Params, rundir: RunDir) -> dict[str, Any] | None:
    """The model this round generates with, made ready: from round 2 on, the previous round's chosen
    variant merged into ``round_<k>/generator/`` (reused when its record names the same adapter and base
    and its files are unchanged). Returns what the round's manifest records about it; None in the plain
    layout."""
    number = params.evolve.round
    if not number:
        return None
    if number == 1:
        return {
            "round": 1,
            "variant": None,
            "model": params.model.name,
            "note": "the configured model (model.name): the first round generates with the base model",
        }

    previous = for_round(params, number - 1)
    validation = read_manifest(previous.run_dir).get("stages", {}).get("05_eval", {}).get("validation") or {}
    variant = validation.get("generator")
    if not variant:
        raise EvolveError(
            f"round {number - 1} chose no generator for round {number}: none of its trained variants "
            f"has a validation Acc@t2 (scores {validation.get('scores')}); check that stages 03/04 trained "
            "variants with a second turn (sft/qa_pairs has none) and that stage 05 of that round finished"
        )
    kind, mode = variant.split("/")
    adapter = previous.run_dir / kind / mode / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        raise EvolveError(
            f"round {number - 1}'s generator {variant} has no adapter at {adapter}; rerun that round "
            f"(reflectevo run PARAMS --from round_{number - 1}:0{'3' if kind == 'sft' else '4'})"
        )
    base = previous.model
    if kind == "dpo" and previous.dpo.start_from != "base":  # the DPO adapter sits on the merged SFT model
        base, _ = dpo_start(previous, RunDir(previous, previous.run_dir), main=True)
    target = generator_dir(params, number)
    source = {
        "round": number - 1,
        "variant": variant,
        "adapter": str(adapter),
        "adapter_sha256": file_sha256(adapter / "adapter_model.safetensors"),
        "base": base.name,
    }
    record_path = target / GENERATOR_RECORD
    existing = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    if existing.get("source") != source or existing.get("digest") != generator_digest(target):
        card = (
            f"# Round {number} generator\n\n{base.name} + the {variant} adapter of round {number - 1} "
            f"({adapter}), merged with PEFT merge_and_unload.\n"
        )
        merge_adapter(base, adapter, target, card)  # a temporary folder, renamed into place
        config = json.loads((target / "config.json").read_text(encoding="utf-8"))
        existing = {
            "source": source,
            "digest": generator_digest(target),
            "dtype": config.get("torch_dtype") or config.get("dtype"),
        }
        atomic_write_json(record_path, existing)
    return {
        "round": number,
        "from_round": number - 1,
        "variant": variant,
        "selection": params.evolve.generator,
        "validation_score": validation.get("score"),
        "protocol": validation.get("protocol"),
        "grader": validation.get("grader"),
        "folder": str(target),
        "digest": existing["digest"],
        "dtype": existing.get("dtype"),
        "base": base.name,
        "adapter": str(adapter),
        "adapter_sha256": source["adapter_sha256"],
    }


def generator_digest(folder: Path) -> str | None:
    """The digest of a merged generator folder's files, its provenance record left out (None when absent)."""
    if not (folder / "config.json").is_file():
        return None
    return folder_sha256(folder, exclude=(GENERATOR_RECORD,))


# ---- the data each round trains on -------------------------------------------------------------------
def row_key(name: str, row: Mapping[str, Any]) -> str:
    """What makes two curated rows the same training example (see the module's "The data")."""
    common = [row.get("task"), row.get("id"), row.get("first_trial_attempt"), row.get("first_trial_feedback")]
    if name == "d_plus":
        own = [row.get("reflections"), row.get("second_trial_attempt")]
    else:
        own = [row.get("reflection_chosen"), row.get("reflection_rejected")]
    return json.dumps(common + own, ensure_ascii=False, sort_keys=True)


def training_data(
    params: Params,
    stage_dir: Path,
    d_plus: Sequence[dict[str, Any]],
    d_pm: Sequence[dict[str, Any]],
    d_pref: Sequence[dict[str, Any]],
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any], list[Path]]:
    """The D+, D± and Dpref rows this round trains on, what the manifest records about them, and the
    files written: this round's own rows (fresh, round 1 and the plain layout), or rounds 1..k's curated
    rows de-duplicated (accumulate), each with the round it came from, in ``reflect/accumulated/``."""

    number = params.evolve.round
    own = {"d_plus": list(d_plus), "d_pm": list(d_pm), "d_pref": list(d_pref)}
    if not number:
        return own, None, []
    if params.evolve.data == "fresh" or number == 1:
        return (
            own,
            {"policy": params.evolve.data, "rounds": [number], "rows": {name: len(rows) for name, rows in own.items()}},
            [],
        )
    union: dict[str, list[dict[str, Any]]] = {name: [] for name in CURATED_SETS}
    contributed: dict[str, dict[str, int]] = {name: {} for name in CURATED_SETS}
    dropped: dict[str, int] = dict.fromkeys(CURATED_SETS, 0)
    for name in CURATED_SETS:
        seen: set[str] = set()
        for source in range(1, number + 1):
            if source == number:
                rows = own[name]
            else:
                path = for_round(params, source).run_dir / "reflect" / "curated" / f"{name}.jsonl"
                if not path.is_file():
                    raise EvolveError(
                        f"evolve.data is accumulate, but round {source}'s {name} rows are missing ({path}); "
                        f"rerun that round (reflectevo run PARAMS --from round_{source}:02)"
                    )
                rows = [row for _, row in read_jsonl(path)]
            keys = [row_key(name, row) for row in rows]
            kept = [{**row, "round": source} for row, key in zip(rows, keys) if key not in seen]
            dropped[name] += len(rows) - len(kept)
            seen.update(keys)
            union[name] += kept
            contributed[name][f"round_{source}"] = len(kept)
    folder = stage_dir / "accumulated"
    written = [write_jsonl_atomic(folder / f"{name}.jsonl", rows) for name, rows in union.items()]
    summary = {
        "policy": "accumulate",
        "rounds": list(range(1, number + 1)),
        "rows": {name: len(rows) for name, rows in union.items()},
        "by_round": contributed,
        "duplicates_dropped": dropped,
        "key": "task, id, first_trial_attempt, first_trial_feedback, and reflections + second_trial_attempt "
        "(D+) or reflection_chosen + reflection_rejected (D±, Dpref)",
    }
    return union, summary, written


def round_record(
    params: Params, generator: dict[str, Any] | None, training: dict[str, Any] | None, accumulated: Sequence[Path]
) -> tuple[dict[str, Any], list[Path]]:
    """What stage 02 of a round adds to its manifest entry (its generator, seed and training data) and to
    its outputs (the merged generator folder, so a deleted one reruns the stage, and the accumulated
    rows); nothing in the plain layout."""
    if not params.evolve.round:
        return {}, []
    files = [*accumulated, *([Path(generator["folder"])] if generator and generator.get("folder") else [])]
    return {"generator": generator, "training_data": training, "seed": params.run.seed}, files


# ---- stopping ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StopDecision:
    after_round: int | None  # the round after which the run stops; None: it goes on
    reason: str
    decided_through: int  # rounds 1..this had their scores compared (what a recorded stop can be checked against)


def stop_rule(evolve: EvolveParams, scores: Mapping[int, float | None]) -> StopDecision:
    """``scores``: the validation score (Acc@t2 of the round's generator choice) of each round whose stage 05
    is finished and current. From round 2 on, in order: stop after round k when its score rose by less
    than ``evolve.stop_margin`` over round k-1's. A round without a score (none of its variants has a
    second turn) never stops the run. Rounds after the first one without a current stage 05 are
    undecided."""
    decided = 1 if 1 in scores else 0
    margin = evolve.stop_margin
    for number in range(2, evolve.rounds + 1):
        if number - 1 not in scores or number not in scores:
            break
        decided = number
        before, after = scores[number - 1], scores[number]
        if margin is None or before is None or after is None:
            continue
        gain = round(after - before, 9)  # no float noise at the margin: 0.75 - 0.5 is exactly 0.25 here
        if gain < margin:
            reason = (
                f"validation Acc@t2 ({evolve.protocol}) went from {before:.4f} in round {number - 1} to {after:.4f} "
                f"in round {number} ({gain:+.4f}), less than evolve.stop_margin {margin:g}"
            )
            return StopDecision(number, reason, number)
    return StopDecision(None, "", decided)
