"""Stages 03 and 04: which variants train on which sets, phase by phase; what notebooks 03-04 and `reflectevo train` call."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflectevo.config import Params, TrainParams
from reflectevo.core.files import atomic_directory, atomic_write_json
from reflectevo.core.seeds import derive_seed
from reflectevo.runs.rundir import RunDir, open_run
from reflectevo.runs.stages import get_stage

if TYPE_CHECKING:
    from reflectevo.config import ModelParams

from reflectevo import __version__, plots
from reflectevo.errors import NoTrainingData, TrainingError
from reflectevo.models.cards import base_model_info, model_card_metadata
from reflectevo.training.adapters import adapter_folders, dpo_start, merge_adapter, process_rank
from reflectevo.training.datasets import (
    heldout_questions,
    heldout_record,
    question_keys,
    screened_set,
    stage_kind,
    stage_section,
    stage_variants,
)
from reflectevo.training.trainer import PhaseResult, train_phase


def training_plan(params: Params, stage: str) -> list[dict[str, Any]]:
    """One row per phase the stage will train (variant, phase, training set, rows, questions, the rows
    kept and those dropped by reason), and one per variant it skips for want of data (``skipped``: why).
    Every set is opened and screened before any model loads: a missing one stops here."""
    plan = []
    for variant, phases in stage_variants(params, stage).items():
        rows = []
        try:
            for phase, name in phases:
                kept, screening = screened_set(params, name)
                rows.append(
                    {
                        "variant": variant,
                        "phase": phase,
                        "training set": name,
                        "rows": screening.rows,
                        "rows kept": len(kept),
                        **{f"dropped: {reason}": n for reason, n in screening.counts().items()},
                        "questions": len(question_keys(kept)),
                    }
                )
        except NoTrainingData as exc:  # the variant is skipped whole (as datasets.variants_without_data says)
            rows = [{"variant": variant, "skipped": exc.reason}]
        plan += rows
    return plan


# ---- variants and stages -------------------------------------------------------------------------
def model_card(
    *,
    stage: str,
    variant: str,
    params: Params,
    base: str,
    base_name: str,
    results: list[PhaseResult],
    identity: str,
    later_phases: Sequence[str] = (),
) -> str:
    """A short README.md for an adapter folder: what it was trained from, on what, and how to load it.
    ``later_phases`` names the phases the variant went on to train after this adapter's last one."""

    section = stage_kind(stage)
    train = stage_section(params, stage)
    last = results[-1].metrics
    info = base_model_info(params.model.name)
    if base_name != params.model.name:  # DPO from a merged SFT model: a local folder under the original's licence
        info = replace(base_model_info(base_name), license=info.license)
    title = f"# reflectevo {section.upper()} adapter: {variant}"
    lines = [
        model_card_metadata(info, tags=[section, "trl"]),
        f"{title}, after phase {results[-1].phase}" if later_phases else title,
        "",
    ]
    if later_phases:
        lines += [
            f"The adapter of {variant} after its {results[-1].phase} phase; the variant's final adapter, in "
            f"`adapter/` beside this folder, continued it through {', '.join(later_phases)}.",
            "",
        ]
    lines += [
        f"- base model: `{base}` (backend {last['backend']}, {last['dtype']})"
        + ("" if info.hub_id else f"; {info.description}"),
        (
            f"- LoRA: r {train.lora.r}, alpha {train.lora.alpha}, dropout {train.lora.dropout}, "
            f"targets {', '.join(train.lora.target_modules)}"
        ),
        (
            f"- run `{params.run.name}`, seed {params.run.seed}; hash of the params this stage reads (run.seed, model, "
            f"{section}) `{params.section_hash(['run.seed', 'model', section])[:16]}`; stage identity `{identity[:16]}`"
        ),
        f"- reflectevo {__version__}",
        "",
        "| phase | training set | train rows | held-out rows | dropped rows | steps | tokens/s | held-out loss before | after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        m = result.metrics
        loss = m["evaluation"].get("heldout_loss", {})
        dropped = ", ".join(f"{reason} {count}" for reason, count in m.get("rows_dropped", {}).items() if count) or "0"
        lines.append(
            f"| {result.phase} | {result.dataset} | {m['rows']['train']} | {m['rows']['heldout']} | {dropped} | "
            f"{m['steps']} | {m['tokens_per_s']} | {_fmt(loss.get('before'))} | {_fmt(loss.get('after'))} |"
        )
    lines += [
        "",
        "Use it in a reflectevo params file:",
        "",
        "```yaml",
        f"model: {{name: {base_name}, adapter: path/to/this/folder}}",
        "```",
        "",
        "or with PEFT: `PeftModel.from_pretrained(base_model, 'path/to/this/folder')`"
        + (
            f" (and `AutoPeftModelForCausalLM.from_pretrained('path/to/this/folder')`, which fetches `{info.hub_id}`)."
            if info.hub_id
            else "; `adapter_config.json` names the base by its folder on the machine that trained it, so "
            "`AutoPeftModelForCausalLM` finds it only there."
        ),
        "",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4f}"


def train_variant(
    *,
    stage: str,
    variant: str,
    params: Params,
    stage_dir: Path,
    identity: str,
    model_params: ModelParams,
    base_description: str,
    callbacks: tuple = (),
) -> list[PhaseResult]:
    """Every phase of one variant, then its adapters (and merged model) in ``stage_dir/variant``: the
    final one in ``adapter/``, an earlier phase's in ``<phase>_adapter/`` (:func:`adapter_folders`)."""
    kind = stage_kind(stage)
    train = stage_section(params, stage)
    phases = stage_variants(params, stage)[variant]
    main = process_rank()[0] == 0
    variant_dir = stage_dir / variant
    sets = {name: screened_set(params, name, in_memory=True) for _, name in phases}
    # one draw for the whole variant, by a seed that names no phase: every phase holds out the same questions
    heldout_seed = derive_seed(params.run.seed, stage, variant, "heldout") % 2**31
    heldout = heldout_record(
        heldout_questions([rows for rows, _ in sets.values()], train.eval_fraction, heldout_seed),
        list(sets),
        heldout_seed,
    )
    results: list[PhaseResult] = []
    adapter_in: Path | None = None
    for phase, dataset_name in phases:
        seed = derive_seed(params.run.seed, stage, variant, phase) % 2**31  # numpy and the Trainer take 32-bit seeds
        rows, screening = sets[dataset_name]
        result = train_phase(
            kind=kind,
            variant=variant,
            phase=phase,
            dataset_name=dataset_name,
            params=params,
            train=train,
            model_params=model_params,
            phase_dir=variant_dir / f"train-{identity[:12]}" / phase,
            adapter_in=adapter_in,
            callbacks=callbacks,
            seed=seed,
            rows=rows,
            screening=screening,
            heldout=heldout,
        )
        results.append(result)
        adapter_in = result.adapter
    if main:
        folders = adapter_folders(phases)
        phase_names = [phase for phase, _ in phases]
        for index, result in enumerate(results):
            later = phase_names[index + 1 :]
            card = model_card(
                stage=stage,
                variant=variant,
                params=params,
                base=base_description,
                base_name=model_params.name,
                results=results[: index + 1],
                identity=identity,
                later_phases=later,
            )
            with atomic_directory(variant_dir / folders[result.phase]) as folder:
                shutil.copytree(result.adapter, folder, dirs_exist_ok=True)
                (folder / "README.md").write_text(card, encoding="utf-8")
        atomic_write_json(
            variant_dir / "metrics.json",
            {"variant": variant, "adapters": folders, "phases": [r.to_dict() for r in results]},
        )
        if train.save_merged:
            merge_adapter(model_params, variant_dir / "adapter", variant_dir / "merged", card)
    return results


@dataclass
class StageSummary:
    """What a training stage produced: one row per phase (``table``) and the paths it wrote."""

    stage: str
    results: list[PhaseResult]
    outputs: list[Path]
    figures: list[Path]
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why it had nothing to train on

    @property
    def trained(self) -> list[str]:
        """The variants this stage trained, in order."""
        return list(dict.fromkeys(result.variant for result in self.results))

    def table(self):
        import pandas as pd

        rows = []
        for result in self.results:
            m = result.metrics
            row = {
                "variant": result.variant,
                "phase": result.phase,
                "train rows": m["rows"]["train"],
                "held-out rows": m["rows"]["heldout"],
                "steps": m["steps"],
                "train loss": m["train_loss"],
                "tokens/s": m["tokens_per_s"],
                "longer than max_length": m["rows_longer_than_max_length"],
            }
            row.update({f"dropped: {reason}": count for reason, count in m.get("rows_dropped", {}).items()})
            for key, values in m["evaluation"].items():
                if key.endswith(("loss", "rewards/accuracies", "rewards/margins")):
                    row[f"{key} before"] = values["before"]
                    row[f"{key} after"] = values["after"]
            rows.append(row)
        return pd.DataFrame(rows)

    def manifest_entry(self) -> dict[str, Any]:
        entry = {}
        for r in self.results:
            phase = {
                k: v
                for k, v in r.metrics.items()
                if k
                in (
                    "rows",
                    "rows_dropped",
                    "steps",
                    "epochs",
                    "tokens",
                    "tokens_per_s",
                    "train_seconds",
                    "train_loss",
                    "evaluation",
                    "resumed_from",
                    "rows_longer_than_max_length",
                    "world_size",
                    "backend",
                    "batching",
                )
            }
            if "heldout_questions" in r.metrics:  # which questions: metrics.json lists them, the manifest their digest
                phase["heldout_questions"] = {k: v for k, v in r.metrics["heldout_questions"].items() if k != "keys"}
            entry[f"{r.variant}/{r.phase}"] = phase
        return entry


def run_training_stage(
    stage: str,
    params: Params,
    rundir: RunDir | None = None,
    *,
    callbacks: tuple = (),
    params_file: str | Path | None = None,
) -> StageSummary:
    """Train every variant of a stage ("03_sft" or "04_dpo") and record it in the run's manifest.

    Pass the notebook's open ``rundir``; without one the run is opened here (and closed at the end).
    Under ``accelerate launch`` / ``torchrun`` only the main process writes the manifest, the figures
    and the final adapters; every process trains.
    """

    kind = stage_kind(stage)
    main = process_rank()[0] == 0
    _check_loggers(stage_section(params, stage))
    plan = training_plan(params, stage)  # every training set must be there before any model loads
    # a variant with nothing to train on is skipped and recorded (a small model may curate no D+ at all)
    skipped = {row["variant"]: row["skipped"] for row in plan if "skipped" in row}
    variants = [variant for variant in stage_variants(params, stage) if variant not in skipped]

    opened_here = rundir is None and main
    if opened_here:
        rundir = open_run(params, params_file=params_file, command=f"reflectevo train {kind}")
    run = rundir if rundir is not None else RunDir(params, params.run_dir)  # other ranks: read-only, no lock
    try:
        stage_run = run.begin_stage(stage) if main else None
        identity = stage_run.identity if stage_run else run.stage_identity(stage)
        stage_dir = params.run_dir / get_stage(stage).folder
        model_params, base = (
            (params.model, params.model.name) if kind == "sft" or not variants else dpo_start(params, run, main)
        )
        results = []
        for variant in variants:
            results += train_variant(
                stage=stage,
                variant=variant,
                params=params,
                stage_dir=stage_dir,
                identity=identity,
                model_params=model_params,
                base_description=base,
                callbacks=callbacks,
            )
        figures: list[Path] = []
        outputs = [
            stage_dir / variant / name
            for variant in variants
            for name in (*adapter_folders(stage_variants(params, stage)[variant]).values(), "metrics.json")
        ]
        if main:
            if results:
                history = plots.training_history([r.to_dict() for r in results])
                fmt, dpi = params.analysis.figure_format, params.analysis.dpi
                drawers = [("loss", plots.training_loss)] + ([("rewards", plots.dpo_rewards)] if kind == "dpo" else [])
                for name, draw in drawers:
                    path = run.figures / f"{stage}_{name}.{fmt}"
                    plots.close(draw(history, path, dpi=dpi))
                    figures.append(path)
            summary = StageSummary(stage, results, outputs, figures, skipped)
            stage_run.finish(
                outputs=[*outputs, *figures], training=summary.manifest_entry(), base_model=base, skipped=skipped
            )
        return StageSummary(stage, results, outputs, figures, skipped)
    except BaseException as exc:
        if main and rundir is not None and not rundir.closed and not isinstance(exc, KeyboardInterrupt):
            run.mark_stage_failed(stage, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if opened_here:
            rundir.close()


def _check_loggers(train: TrainParams) -> None:
    import importlib.util

    for logger in train.report_to:
        if importlib.util.find_spec(logger) is None:
            raise TrainingError(
                f"report_to lists {logger}, which is not installed: pip install {logger}, or remove it from report_to"
            )


def run_sft(params: Params, rundir: RunDir | None = None, **kwargs: Any) -> StageSummary:
    """Stage 03: every mode of ``sft.modes`` into ``outputs/<run>/sft/<mode>/``."""
    return run_training_stage("03_sft", params, rundir, **kwargs)


def run_dpo(params: Params, rundir: RunDir | None = None, **kwargs: Any) -> StageSummary:
    """Stage 04: every pair type of ``dpo.pairs`` into ``outputs/<run>/dpo/<pairs>/``."""
    return run_training_stage("04_dpo", params, rundir, **kwargs)
