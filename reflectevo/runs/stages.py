"""The six stages, what each reads, and the rounds of self-evolution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reflectevo.config import Params, round_folder, validate_params
from reflectevo.core.seeds import derive_seed
from reflectevo.errors import StageError


@dataclass(frozen=True)
class Stage:
    key: str  # "01_data": notebook file stem and manifest key
    number: str  # "01"
    folder: str  # the stage's folder in the run directory
    reads: tuple[str, ...]  # params sections or dotted keys whose change reruns the stage
    depends: tuple[str, ...]  # numbers of the stages it reads outputs of

    @property
    def notebook(self) -> str:
        return f"{self.key}.ipynb"


STAGES: tuple[Stage, ...] = (
    Stage("01_data", "01", "data", ("run.seed", "data"), ()),
    Stage("02_reflect", "02", "reflect", ("run.seed", "model", "generation", "reflect"), ("01",)),
    Stage("03_sft", "03", "sft", ("run.seed", "model", "sft"), ("02",)),
    Stage("04_dpo", "04", "dpo", ("run.seed", "model", "dpo"), ("02",)),
    Stage("05_eval", "05", "eval", ("run.seed", "model", "generation", "eval"), ("01", "03", "04")),
    Stage("06_analysis", "06", "figures", ("analysis",), ("02", "05")),
)


def get_stage(name: str) -> Stage:
    """A stage by number ("01") or key ("01_data")."""
    for stage in STAGES:
        if name in (stage.number, stage.key):
            return stage
    raise StageError(f"unknown stage {name!r}; the stages are {', '.join(s.key for s in STAGES)}")


# ---- rounds of self-evolution ------------------------------------------------------------------
ROUND_STAGES = ("02", "03", "04", "05")  # run once per round; 01 and 06 once per run
GENERATOR_FOLDER = "generator"  # round_<k>/generator/: the model round k starts from (k >= 2)


def is_round_stage(stage: Stage) -> bool:
    return stage.number in ROUND_STAGES


def evolving(params: Params) -> bool:
    """Whether the run has several rounds (the round layout); one round is the plain layout."""
    return params.evolve.rounds >= 2


def round_seed(seed: int, round_number: int) -> int:
    """Round k's ``run.seed``: the run's seed in round 1 (round 1 is exactly the plain run), else one
    derived from it and k, so later rounds draw other instructions and samples."""
    return seed if round_number == 1 else derive_seed(seed, "evolve-round", round_number) % 2**31


def generator_dir(params: Params, round_number: int) -> Path:
    """Where round ``round_number`` (>= 2) keeps the merged model it generates with and trains further."""
    return params.top_run_dir / round_folder(round_number) / GENERATOR_FOLDER


def for_round(params: Params, round_number: int | None = None) -> Params:
    """One round's params: its folder (``run_dir``), its seed (:func:`round_seed`) and, from round 2 on,
    its model: the merged generator folder that stage 02 of the round writes. ``round_number`` defaults
    to ``evolve.round`` (which ``reflectevo run`` injects into the per-round notebooks). Params without a
    round (the plain layout, stages 01 and 06) come back unchanged; so do params already resolved for
    that round. Every stage notebook calls this right after validating its params."""
    number = params.evolve.round if round_number is None else round_number
    if not params.round_resolved and params.evolve.round is not None:
        params = params.model_copy(update={"evolve": params.evolve.model_copy(update={"round": None})})  # as injected
    if number is None or not evolving(params):
        if number not in (None, 1):
            raise StageError(f"round {number} asked for, but evolve.rounds is {params.evolve.rounds}")
        return params
    if not 1 <= number <= params.evolve.rounds:
        raise StageError(f"round {number} is outside 1..{params.evolve.rounds} (evolve.rounds)")
    if params.round_resolved:
        return params if params.evolve.round == number else for_round(params.run_params, number)
    raw = params.to_dict()
    raw["evolve"]["round"] = number
    if number >= 2:
        raw["run"]["seed"] = round_seed(params.run.seed, number)
        raw["model"].update(name=str(generator_dir(params, number)), adapter=None, revision=None)
    resolved = validate_params(raw, f"round {number} of run {params.run.name}")
    resolved._run_params = params
    return resolved
