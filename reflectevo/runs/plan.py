"""Stage addresses and identities: what a stage depends on, in which order stages run, what is recorded."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reflectevo.config import Params, round_folder
from reflectevo.core.seeds import canonical_hash
from reflectevo.errors import ReflectEvoError, StageError
from reflectevo.runs.provenance import versions_of_tasks_and_prompts
from reflectevo.runs.stages import ROUND_STAGES, STAGES, Stage, evolving, for_round, get_stage, is_round_stage

MANIFEST = "manifest.json"


def depends_on(stage: Stage, params: Params) -> tuple[str, ...]:
    """The stages ``stage`` reads outputs of with these params: DPO that starts from an SFT variant
    (``dpo.start_from``) also depends on 03_sft, so retraining that variant reruns DPO."""
    if stage.key == "04_dpo" and params.dpo.start_from != "base":
        return (*stage.depends, "03")
    return stage.depends


def identity_of(params: Params, stage: Stage, upstream: dict[str, str | None]) -> str:
    """A stage's identity: the hash of the params it reads, of the task, grader and prompt versions
    (:func:`versions_of_tasks_and_prompts`) and of its upstream stages' identities. The versions are
    in it so that a run made before a grading or prompt change is recomputed, not skipped with its
    old verdicts."""
    return canonical_hash(
        {
            "params": params.section_hash(stage.reads),
            "upstream": upstream,
            "versions": versions_of_tasks_and_prompts(params.data.tasks),
        }
    )


@dataclass(frozen=True)
class Address:
    """A stage of a run: ``01_data``, ``06_analysis``, or a per-round stage ``round_<k>:03_sft``."""

    stage: Stage
    round: int | None = None

    @property
    def key(self) -> str:
        return f"{round_folder(self.round)}:{self.stage.key}" if self.round else self.stage.key


def run_order(params: Params, stages: Sequence[Stage] = STAGES) -> list[Address]:
    """Every stage of the run in execution order: 01, then 02-05 of round 1, of round 2, ..., then 06."""
    if not evolving(params):
        return [Address(stage) for stage in stages]
    order = [Address(stage) for stage in stages if stage.number < ROUND_STAGES[0]]
    for number in range(1, params.evolve.rounds + 1):
        order += [Address(stage, number) for stage in stages if is_round_stage(stage)]
    return order + [Address(stage) for stage in stages if stage.number > ROUND_STAGES[-1]]


ROUND_ADDRESS = re.compile(r"round_(\d+):(.+)")


def parse_address(name: str, params: Params) -> list[Address]:
    """The stages a ``--stages``/``--from`` name means: ``03`` (or ``03_sft``) is that stage, in every
    round of a run of several rounds; ``round_2:03`` is stage 03 of round 2. Mistakes are errors."""
    name = name.strip()
    found = ROUND_ADDRESS.fullmatch(name)
    if found is None:
        if name.startswith("round"):
            raise StageError(f"malformed stage address {name!r}: write round_<k>:<stage>, e.g. round_2:03")
        stage = get_stage(name)
        if evolving(params) and is_round_stage(stage):
            return [Address(stage, number) for number in range(1, params.evolve.rounds + 1)]
        return [Address(stage)]
    number, stage = int(found.group(1)), get_stage(found.group(2))
    if not evolving(params):
        raise StageError(
            f"{name!r} names a round, but this run has one round (evolve.rounds: 1, the plain layout); "
            f"address the stage as {stage.number}"
        )
    if not 1 <= number <= params.evolve.rounds:
        raise StageError(f"{name!r}: round {number} is outside 1..{params.evolve.rounds} (evolve.rounds)")
    if not is_round_stage(stage):
        raise StageError(f"{name!r}: stage {stage.key} runs once per run, not per round; address it as {stage.number}")
    return [Address(stage, number)]


def upstream_of(address: Address, params: Params, last_round: int | None = None) -> dict[str, Address]:
    """The stages ``address`` reads outputs of, by the names its identity records them under. In the
    plain layout these are :func:`depends_on`. With rounds, a round's stages depend on the run's 01 and
    on the stages of their own round as in the plain layout; stage 02 of round k >= 2 also on round
    k-1's 03, 04 and 05 (its generator is chosen from their results); stage 06 on 02 and 05 of every
    round up to ``last_round`` (the last round run: evolve.rounds, or the round the stopping rule
    stopped after)."""
    stage = address.stage
    if not evolving(params):
        return {get_stage(n).key: Address(get_stage(n)) for n in depends_on(stage, params)}
    if address.round is None:
        if not is_round_stage(stage) and stage.number > ROUND_STAGES[-1]:
            last = params.evolve.rounds if last_round is None else last_round
            return {
                Address(get_stage(n), k).key: Address(get_stage(n), k) for k in range(1, last + 1) for n in ("02", "05")
            }
        return {get_stage(n).key: Address(get_stage(n)) for n in depends_on(stage, params)}
    upstream = {}
    for number in depends_on(stage, params):
        dep = get_stage(number)
        upstream[dep.key] = Address(dep, address.round if is_round_stage(dep) else None)
    if stage.number == "02" and address.round >= 2:
        for number in ("03", "04", "05"):
            previous = Address(get_stage(number), address.round - 1)
            upstream[previous.key] = previous
    return upstream


def evolve_marker(params: Params, address: Address, last_round: int | None = None) -> dict[str, Any] | None:
    """What a stage of a run of several rounds depends on beyond its params sections and upstream, in
    its identity. None where the stage does exactly what it does in the plain layout (stage 01, and 02-04
    of round 1), so those identities equal the plain run's."""
    if not evolving(params):
        return None
    evolve = params.evolve
    if address.round is None:
        if address.stage.number > ROUND_STAGES[-1]:
            last = evolve.rounds if last_round is None else last_round
            return {"rounds": list(range(1, last + 1)), "protocol": evolve.protocol}
        return None
    marker: dict[str, Any] = {}
    if address.round >= 2:
        marker.update(round=address.round, generator=evolve.generator, data=evolve.data)
    if address.stage.number == "05":  # it also scores the trained variants on the validation split
        marker["validation_protocol"] = evolve.protocol
    return marker or None


def address_identity(
    params: Params, address: Address, upstream: dict[str, str | None], last_round: int | None = None
) -> str:
    """The identity of a stage of the run (:func:`identity_of` with the round's params and marker)."""
    own = for_round(params, address.round) if address.round else params
    marker = evolve_marker(params, address, last_round)
    if marker is None:
        return identity_of(own, address.stage, upstream)
    return canonical_hash(
        {
            "params": own.section_hash(address.stage.reads),
            "upstream": upstream,
            "evolve": marker,
            "versions": versions_of_tasks_and_prompts(own.data.tasks),
        }
    )


def round_manifest_path(top: Path, round_number: int | None) -> Path:
    return top / round_folder(round_number) if round_number else top


def recorded_entry(top: Path, address: Address, cache: dict[Path, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest entry of ``address`` in the run at ``top`` (empty when it never ran)."""
    folder = round_manifest_path(top, address.round)
    if cache is not None and folder in cache:
        manifest = cache[folder]
    else:
        manifest = read_manifest(folder)
        if cache is not None:
            cache[folder] = manifest
    return manifest.get("stages", {}).get(address.stage.key, {})


def last_round(params: Params, top_manifest: dict[str, Any]) -> int:
    """The last round of the run: evolve.rounds, or the round the stopping rule stopped after (recorded
    in the run's manifest by ``reflectevo run``)."""
    stopped = (top_manifest.get("evolve") or {}).get("stopped") or {}
    after = stopped.get("after_round")
    return min(int(after), params.evolve.rounds) if isinstance(after, int) else params.evolve.rounds


def included_rounds(params: Params, top_manifest: dict[str, Any]) -> list[int]:
    """The rounds stage 06 analyses: 1..last_round; empty in the plain layout."""
    return list(range(1, last_round(params, top_manifest) + 1)) if evolving(params) else []


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise ReflectEvoError(
            f"{path} is not valid JSON ({exc}); it is only ever replaced whole, so it was edited by hand"
        ) from None
