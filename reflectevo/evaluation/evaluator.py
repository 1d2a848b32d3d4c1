"""Evaluation of one variant: first turns, the protocols, second turns, graded predictions."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflectevo.config import (
    Params,
)
from reflectevo.core.seeds import canonical_hash
from reflectevo.errors import EvaluationError
from reflectevo.evaluation.variants import ModelPool, ModelRef, Variant
from reflectevo.generation.requests import GenerationRequest, GenerationSettings
from reflectevo.prompts import (
    ATTEMPT_STOP,
    GENERIC_INSTRUCTION,
    PROMPT_VERSION,
    REFLECTION_VERSION,
    REVIEW_VERSION,
    THOUGHT_STOP,
    action_messages,
    action_opening,
    attempt_prompt,
    join_two_calls,
    parse_self_verdict,
    reflection_prompt,
    review_prompt,
    review_second_trial_prompt,
    second_trial_prompt,
    self_verify_prompt,
    split_one_stage,
    thought_messages,
    with_one_stage_suffix,
)
from reflectevo.reflection.pipeline import make_sandbox
from reflectevo.tasks import GRADERS, Item, Verdict, get_task

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"


# ---- protocols --------------------------------------------------------------------------------------
def oracle_graders(params: Params) -> list[str]:
    """The graders the oracle protocol runs under, once each, gated by that grader. A fixed order
    (official before robust), so a grader's generation store is planned the same way whatever order
    ``eval.graders`` lists them in."""
    return [grader for grader in GRADERS if grader in params.eval.graders]


def protocol_runs(params: Params) -> list[tuple[str, str | None]]:
    """(protocol, gating grader) of every evaluation each variant gets: the oracle once per grader of
    :func:`oracle_graders`, every other protocol once (its gate is no grader)."""
    return [
        (protocol, grader)
        for protocol in params.eval.protocols
        for grader in (oracle_graders(params) if protocol == "oracle" else [None])
    ]


# ---- one turn of many questions -------------------------------------------------------------------
@dataclass
class Turn:
    """One generated answer and its verdict under every grader."""

    text: str
    verdicts: dict[str, Verdict]
    prompt: str = ""
    finish_reason: str = ""  # "length" when any call of the answer stopped at the token limit

    def to_dict(self, graders: Sequence[str]) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            **{g: graded(self.verdicts[g]) for g in graders},
        }


def graded(verdict: Verdict) -> dict[str, Any]:
    """What a prediction keeps of one verdict: the outcome and the answer read, and, when the robust grader
    read an output that had no action line as a whole, that it did (``fallback``)."""
    out = {"outcome": verdict.outcome, "extracted": verdict.extracted}
    if verdict.details.get("fallback"):
        out["fallback"] = verdict.details["fallback"]
    return out


@dataclass
class Evaluator:
    params: Params
    pool: ModelPool
    store_dir: Path | None = None
    sandbox: Any = None
    force: bool = False
    # under data-parallel generation: every process takes the main process's verdicts (see ReflectionPipeline)
    share_verdicts: Callable[[dict[str, dict[str, Verdict]]], dict[str, dict[str, Verdict]]] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    first_turns: dict[str, dict[tuple[str, str], Turn]] = field(default_factory=dict)  # first-turn model key -> turns

    @property
    def graders(self) -> list[str]:
        """The graders every answer is judged by (``eval.graders``)."""
        return list(self.params.eval.graders)

    def oracle_graders(self) -> list[str]:
        return oracle_graders(self.params)

    def _settings(self, kind: str) -> GenerationSettings:
        """Greedy by default (the ``generation`` section); attempts end at the action line (the thought call
        of a two-call attempt at its ``Action:``), and a one-stage output (a reflection, then a new attempt)
        may be as long as both together."""
        ev = self.params.eval
        lengths = {
            "attempt": ev.max_new_tokens,
            "thought": ev.max_new_tokens,
            "reflection": ev.reflection_max_new_tokens,
            "one_stage": ev.reflection_max_new_tokens + ev.max_new_tokens,
        }
        stop = {"reflection": (), "thought": THOUGHT_STOP}.get(kind, ATTEMPT_STOP)
        return GenerationSettings.from_params(
            self.params.generation, n=1, stop=stop, seed=self.params.run.seed, max_new_tokens=lengths[kind]
        )

    def generate(
        self,
        ref: ModelRef,
        requests: dict[str, str | list[dict[str, Any]]],
        kind: str,
        store: str,
        reuse: dict[tuple[str, ...], Any] | None = None,
    ) -> dict[str, Any]:
        """``{key: GenerationOutput}`` for ``{key: user message or chat messages}``, generated by ``ref``.

        ``reuse`` maps (model, kind, key, messages) to an output generated earlier in the same evaluation:
        a request found there is not generated again (the oracle under a second grader asks the same
        question with the same prompt wherever the graders agree), and new outputs are added to it."""
        if not requests:
            return {}
        started = time.perf_counter()
        messages = {
            key: [{"role": "user", "content": value}] if isinstance(value, str) else value
            for key, value in requests.items()
        }

        def reuse_key(key: str) -> tuple[str, ...]:
            return (ref.key, kind, key, json.dumps(messages[key], ensure_ascii=False, sort_keys=True))

        found = {key: reuse[reuse_key(key)] for key in messages if reuse is not None and reuse_key(key) in reuse}
        wanted = [GenerationRequest(key, value) for key, value in messages.items() if key not in found]
        outputs = []
        if wanted:
            store_dir = self.store_dir / store if self.store_dir is not None else None
            with self.pool.active(ref) as engine:
                outputs = engine.generate(
                    wanted, self._settings(kind), stage=store.replace("/", "_"), store_dir=store_dir, force=self.force
                )
            self.seconds[store] = round(time.perf_counter() - started, 2)
        if reuse is not None:
            reuse.update({reuse_key(output.key): output for output in outputs})
        generated = {output.key: output for output in outputs}
        return {key: found.get(key) or generated[key] for key in messages}

    def grade(self, items: dict[str, Item], texts: dict[str, str]) -> dict[str, dict[str, Verdict]]:
        """``{key: {grader: verdict}}``, task by task (code runs in the sandbox, in parallel)."""
        verdicts: dict[str, dict[str, Verdict]] = {key: {} for key in texts}
        by_task: dict[str, list[str]] = {}
        for key in texts:
            by_task.setdefault(items[key].task, []).append(key)
        for name, keys in by_task.items():
            task = get_task(name)
            for grader in self.graders:
                for key, verdict in zip(
                    keys, task.grade_many([items[k] for k in keys], [texts[k] for k in keys], grader, self.sandbox)
                ):
                    verdicts[key][grader] = verdict
        return self.share_verdicts(verdicts) if self.share_verdicts is not None else verdicts

    def attempts(
        self,
        ref: ModelRef,
        items: dict[str, Item],
        users: dict[str, str],
        store: str,
        reuse: dict[tuple[str, ...], Any] | None = None,
    ) -> dict[str, Turn]:
        """Attempts for ``{key: user message}``, graded: one call that ends at the action line, or, with
        ``eval.attempt_calls: 2``, the paper's two calls (the thought, then the action with the thought given),
        as stage 02 makes them with ``reflect.attempt_calls``."""
        if self.params.eval.attempt_calls == 1:
            outputs = self.generate(ref, users, "attempt", store, reuse)
            texts = {key: output.text.strip() for key, output in outputs.items()}
            finish = {key: output.finish_reason for key, output in outputs.items()}
        else:
            thoughts = self.generate(
                ref, {key: thought_messages(user) for key, user in users.items()}, "thought", f"{store}/thought", reuse
            )
            opening = {
                key: action_opening(get_task(items[key].task), self.params.eval.attempt_prefill) for key in users
            }
            outputs = self.generate(
                ref,
                {key: action_messages(user, thoughts[key].text, opening[key]) for key, user in users.items()},
                "attempt",
                f"{store}/action",
                reuse,
            )
            texts = {
                key: join_two_calls(thoughts[key].text, output.text, opening[key]) for key, output in outputs.items()
            }
            finish = {
                key: "length"
                if "length" in (thoughts[key].finish_reason, output.finish_reason)
                else output.finish_reason
                for key, output in outputs.items()
            }
        verdicts = self.grade(items, texts)
        return {key: Turn(texts[key], verdicts[key], outputs[key].prompt, finish[key]) for key in texts}

    def first_turn(self, ref: ModelRef, items: dict[str, Item]) -> dict[str, Turn]:
        """The first turns of ``ref`` on every item, generated once per first-turn model."""
        if ref.key not in self.first_turns:
            users = {
                key: attempt_prompt(get_task(item.task), item, self.params.eval.fewshots) for key, item in items.items()
            }
            self.first_turns[ref.key] = self.attempts(ref, items, users, f"first_turn/{ref.key}")
        return self.first_turns[ref.key]

    # ---- one variant under one protocol -----------------------------------------------------------
    def evaluate(self, variant: Variant, protocol: str, items: dict[str, Item]) -> list[dict[str, Any]]:
        """One prediction per item; under the oracle, one per item and grader of :meth:`oracle_graders`.

        The oracle is run once per grader, gated by that grader and showing its feedback, so each oracle
        table is scored by the grader that decided who reflects (an answer only one grader accepts would
        otherwise be reflected on and could turn wrong under the other). First turns are shared; where two
        graders gate an item alike with the same feedback, its reflection and second turn are shared too."""
        if protocol != "oracle":
            return self.evaluate_gated(variant, protocol, items, None, f"{variant.name}/{protocol}")
        rows: list[dict[str, Any]] = []
        reuse: dict[tuple[str, ...], Any] = {}
        earlier: list[str] = []
        for grader in self.oracle_graders():
            # a later grader's store holds only what the earlier graders did not generate: its name says which
            store = f"{variant.name}/oracle-{grader}" + (f"-beyond-{'-'.join(earlier)}" if earlier else "")
            rows += self.evaluate_gated(variant, protocol, items, grader, store, reuse)
            earlier.append(grader)
        return rows

    def evaluate_gated(
        self,
        variant: Variant,
        protocol: str,
        items: dict[str, Item],
        gate_grader: str | None,
        where: str,
        reuse: dict[tuple[str, ...], Any] | None = None,
    ) -> list[dict[str, Any]]:
        """``variant`` under ``protocol``; under the oracle, ``gate_grader`` decides who reflects and its feedback is shown."""
        ev = self.params.eval
        oracle = protocol == "oracle"
        first = self.first_turn(variant.first_turn, items)
        gate = {
            key: (
                "none"
                if not variant.has_second_turn
                else "grader"
                if oracle
                else "always"
                if protocol == "oracle_free"
                else "self_verify"
            )
            for key in items
        }
        self_checks: dict[str, tuple[str, str | None]] = {}
        if protocol == "self_verify" and variant.has_second_turn:
            judge = variant.reflector or variant.first_turn
            users = {key: self_verify_prompt(items[key], first[key].text) for key in items}
            outputs = self.generate(judge, users, "reflection", f"{where}/self_verify")
            self_checks = {key: (out.text.strip(), parse_self_verdict(out.text)) for key, out in outputs.items()}

        def reflects(key: str) -> bool:
            if not variant.has_second_turn:
                return False
            if oracle:
                return not first[key].verdicts[gate_grader].correct
            if protocol == "self_verify":
                return self_checks[key][1] != "correct"  # no verdict: reviewed, like a "wrong"
            return True

        chosen = [key for key in items if reflects(key)]
        feedback = {key: first[key].verdicts[gate_grader].feedback for key in chosen} if oracle else {}

        reflections: dict[str, str | None] = {key: None for key in chosen}
        reflection_finish: dict[str, str] = {}
        second: dict[str, Turn] = {}
        if variant.reflector is not None and chosen:
            users = {}
            for key in chosen:
                item, attempt = items[key], first[key].text
                user = (
                    reflection_prompt(item, attempt, feedback[key], GENERIC_INSTRUCTION)
                    if oracle
                    else review_prompt(item, attempt)
                )
                users[key] = with_one_stage_suffix(get_task(item.task), user) if variant.one_stage else user
            outputs = self.generate(
                variant.reflector,
                users,
                "one_stage" if variant.one_stage else "reflection",
                f"{where}/reflection",
                reuse,
            )
            reflection_finish = {key: output.finish_reason for key, output in outputs.items()}
            if variant.one_stage:
                split = {key: split_one_stage(output.text) for key, output in outputs.items()}
                reflections = {key: parts[0] for key, parts in split.items()}
                texts = {key: (parts[1] or "") for key, parts in split.items()}  # no "Answer:": a parse failure
                verdicts = self.grade(items, texts)
                second = {
                    key: Turn(texts[key], verdicts[key], outputs[key].prompt, outputs[key].finish_reason)
                    for key in texts
                }
            else:
                reflections = {key: output.text.strip() for key, output in outputs.items()}
        if variant.second_turn is not None and chosen:
            users = {}
            for key in chosen:
                item, task, attempt = items[key], get_task(items[key].task), first[key].text
                if oracle:
                    previous = (attempt, feedback[key]) if ev.second_trial == "reflection_and_attempt" else None
                    users[key] = second_trial_prompt(task, item, reflections[key], ev.fewshots, previous=previous)
                else:
                    users[key] = review_second_trial_prompt(task, item, reflections[key], attempt, ev.fewshots)
            second = self.attempts(variant.second_turn, items, users, f"{where}/second_turn", reuse)
        return [
            self.prediction(
                variant,
                protocol,
                items[key],
                first[key],
                gate[key],
                self_checks.get(key),
                key in second,
                reflections.get(key),
                second.get(key),
                gate_grader,
                reflection_finish.get(key),
            )
            for key in items
        ]

    def prediction(
        self,
        variant: Variant,
        protocol: str,
        item: Item,
        first: Turn,
        gate: str,
        self_check: tuple | None,
        reflected: bool,
        reflection: str | None,
        second: Turn | None,
        gate_grader: str | None = None,
        reflection_finish: str | None = None,
    ) -> dict[str, Any]:
        graders = self.params.eval.graders
        standing = second if second is not None else first
        return {
            "variant": variant.name,
            "protocol": protocol,
            "task": item.task,
            "id": item.id,
            "question": item.question,
            "gold": item.gold,
            "breakdown": breakdown_of(item),
            "roles": variant.roles(),
            "t1": first.to_dict(graders),
            "reflected": reflected,
            "gate": {
                "by": gate,
                "self_verify_text": self_check[0] if self_check else None,
                "self_verdict": self_check[1] if self_check else None,
            },
            "reflection": reflection,
            "reflection_finish_reason": reflection_finish,  # "length": cut at eval.reflection_max_new_tokens
            "t2": second.to_dict(graders) if second is not None else None,
            "final": {g: standing.verdicts[g].outcome for g in graders} if variant.has_second_turn else None,
            # under the oracle, the grader that gated this row: its tables score the row under that grader only
            "gate_grader": gate_grader,
            "versions": self.versions(item.task),
        }

    @staticmethod
    def versions(task: str) -> dict[str, str]:
        return {
            "task": get_task(task).version,
            "prompts": PROMPT_VERSION,
            "reflection": REFLECTION_VERSION,
            "review": REVIEW_VERSION,
        }

    def run(self, variants: Sequence[Variant], items_by_task: dict[str, list[Item]]) -> list[dict[str, Any]]:
        """Every variant under every protocol of ``eval.protocols``; first turns are shared."""
        items = {f"{item.task}/{item.id}": item for task_items in items_by_task.values() for item in task_items}
        if not items:
            raise EvaluationError(
                f"no {self.params.eval.split} items to evaluate (tasks {sorted(items_by_task)}); "
                "check data.max_items and data.tasks"
            )
        refs = [ref for v in variants for ref in (v.first_turn, v.reflector, v.second_turn) if ref is not None]
        self.pool.prepare(refs)
        predictions = []
        for variant in variants:
            for protocol in self.params.eval.protocols:  # a variant without a second turn costs nothing more here
                log.info("evaluating %s under the %s protocol", variant.name, protocol)
                predictions.extend(self.evaluate(variant, protocol, items))
        return predictions


def breakdown_of(item: Item) -> dict[str, Any]:
    """The fields results are broken down by: BIG-bench row type, MATH level and subject."""
    keys = {"bigbench": ("answer_type",), "math": ("level", "subject")}.get(item.task, ())
    return {key: item.metadata.get(key) for key in keys}


def make_evaluator(params: Params, store_dir: Path | None, *, progress: bool = True, force: bool = False) -> Evaluator:
    """An evaluator with its model pool and, when a task runs code, the sandbox (refused unless
    ``run.allow_code_execution`` is true)."""

    sandbox = make_sandbox(params, params.data.tasks)
    return Evaluator(params, ModelPool(params, progress=progress), store_dir, sandbox=sandbox, force=force)


# What the generated text depends on. Not the reported graders, the bootstrap or the list of variants
# and protocols (each variant, protocol and oracle grader has its own store): changing those reuses every
# generation already made.
GENERATION_KEYS = (
    "run.seed",
    "model",
    "generation",
    "eval.split",
    "eval.first_turn",
    "eval.second_turn_after_sft",
    "eval.second_turn_after_dpo",
    "eval.second_trial",
    "eval.fewshots",
    "eval.attempt_calls",
    "eval.max_new_tokens",
    "eval.reflection_max_new_tokens",
)


def evaluation_store_dir(stage_dir: Path, params: Params, manifest: dict[str, Any]) -> Path:
    """Where stage 05's generation stores live: named after the params the text depends on and the
    identities of the data and the trained adapters, so other settings start afresh beside them."""

    stages = manifest.get("stages", {})
    upstream = {key: stages.get(key, {}).get("identity") for key in ("01_data", "03_sft", "04_dpo")}
    return (
        stage_dir
        / "generations"
        / canonical_hash({"params": params.section_hash(GENERATION_KEYS), "upstream": upstream})[:12]
    )
