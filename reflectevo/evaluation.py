"""Two-turn evaluation (stage 05): who answers, who reflects, under which protocol, and every prediction.

    plan = plan_variants(params, run_dir)              # the variants and their roles, checked up front
    evaluator = Evaluator(params, ModelPool(params), store_dir, sandbox=sandbox)
    predictions = evaluator.run(plan, items)           # one row per variant x protocol x item

A *variant* is a model setting of the paper's main table (method.md §7): the two prompt baselines
(``retry``: told it was wrong, the untrained model answers again without reflecting; ``base``: it
reflects first), and each trained variant (``sft/<mode>``, ``dpo/<pairs>``). Each has three roles:

* the **first turn**: by default the base model, answered once and shared by every variant, so Acc@t1
  is the same in every row (as in the paper); ``eval.first_turn: variant`` lets each answer its own;
* the **reflector**: the variant itself (the base model for ``base``; nobody for ``retry``);
* the **second turn**: the variant after SFT (two-stage SFT trained the correction too), the base after
  DPO (which trained reflections only), both configurable; one-stage SFT writes its new answer in the
  same output as its reflection; ``sft/qa_pairs`` (the paper's "SFT on QA pairs") has no second turn:
  it answers its own first turn, which is all the paper reports for it.

The *protocols* (recorded in every row):

* ``oracle``, the paper's: only answers the grader rejects get a reflection; the reflector is told the
  answer was wrong and, for MBPP, shown the failing test. It runs once per grader of ``eval.graders``,
  gated by that grader, and each run is scored by that grader only (the row's ``gate_grader``). So within
  every oracle table a first answer the grader accepted is never asked again, and Acc@t2 cannot fall
  below Acc@t1 (right-to-wrong is 0). That holds for the grader that gated: scored by another grader, an
  answer only the gating grader rejected could be reflected on and turn wrong.
* ``oracle_free``: every answer is reviewed with a prompt that does not say whether it was right and
  shows no test result (:data:`reflectevo.prompts.REVIEW_VERSION`); the model may keep its answer, so
  answers can flip from right to wrong, and they are counted.
* ``self_verify``: the reflector (the base model for the baselines) first judges the first answer;
  only answers it calls wrong (or gives no verdict on) are reviewed, with the oracle-free prompts.

Every generation call commits its batches to a store named after the stage's generation settings, the
variant and the protocol (and, for the oracle, its grader), so a rerun resumes and a finished variant is
not generated again. Verdicts are cheap and
recomputed. The metrics live in :mod:`reflectevo.metrics`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflectevo.config import (
    BASELINES,
    TWO_STAGE_REFLECTION_PHASE,
    ModelParams,
    Params,
    training_test_mismatches,
)
from reflectevo.errors import ReflectEvoError
from reflectevo.generation import GenerationRequest, GenerationSettings
from reflectevo.prompts import (
    ATTEMPT_STOP,
    GENERIC_INSTRUCTION,
    PROMPT_VERSION,
    REFLECTION_VERSION,
    REVIEW_VERSION,
    THOUGHT_STOP,
    action_messages,
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
from reflectevo.tasks import GRADERS, Item, Verdict, get_task

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
BASE = "base"


# Two-stage SFT evaluated with the adapter of its reflection phase as the reflector (the adapter that learnt
# to reflect, before the correction phase continued it) and its final adapter answering the second turn:
# the variant named by reflectevo.config.TWO_STAGE_REFLECTION_PHASE.
REFLECTION_PHASE_ADAPTER = "reflection_adapter"  # its folder in sft/two_stage/ (reflectevo.training)


class EvaluationError(ReflectEvoError):
    """An evaluation that cannot start: a variant that was not trained, an engine that cannot switch adapters."""


# ---- the variants and their roles -----------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """One model a role is played by: a base model, with or without a LoRA adapter."""

    key: str  # "base", "sft/one_stage", ...: names the generation stores
    base: ModelParams
    adapter: Path | None = None

    @property
    def base_key(self) -> str:
        return self.base.name


@dataclass(frozen=True)
class Variant:
    name: str  # "retry", "base", "sft/one_stage", ...
    first_turn: ModelRef
    reflector: ModelRef | None  # None: no reflection (retry, qa_pairs)
    second_turn: ModelRef | None  # None: no second turn (qa_pairs), or the reflector's own output (one-stage)
    one_stage: bool = False

    @property
    def has_second_turn(self) -> bool:
        return self.one_stage or self.second_turn is not None

    def roles(self) -> dict[str, str | None]:
        second = self.reflector.key if self.one_stage and self.reflector else (self.second_turn.key if self.second_turn else None)
        return {"first_turn": self.first_turn.key, "reflector": self.reflector.key if self.reflector else None,
                "second_turn": second}


def trained_variants(params: Params) -> list[str]:
    """The variants stages 03 and 04 train with these params. Two-stage SFT is evaluated with its final
    adapter as the reflector (``sft/two_stage``), with its reflection-phase adapter as the reflector
    (:data:`TWO_STAGE_REFLECTION_PHASE`), or both, as ``eval.two_stage_reflector`` says."""
    names = []
    for mode in params.sft.modes:
        if mode == "two_stage" and params.eval.two_stage_reflector != "final":
            names += [*(["sft/two_stage"] if params.eval.two_stage_reflector == "both" else []), TWO_STAGE_REFLECTION_PHASE]
        else:
            names.append(f"sft/{mode}")
    return [*names, *(f"dpo/{pairs}" for pairs in params.dpo.pairs)]


def variant_folder(run_dir: Path, name: str) -> Path:
    """The folder of the stage-03/04 variant a trained variant's adapters come from (``sft/two_stage`` for
    both two-stage variants)."""
    return run_dir / name.split(":")[0]


def reflector_adapter(run_dir: Path, name: str) -> Path:
    """The adapter that reflects for a trained variant: the variant's final adapter, or, for
    :data:`TWO_STAGE_REFLECTION_PHASE`, two-stage SFT's reflection-phase adapter (before its correction phase)."""
    folder = variant_folder(run_dir, name)
    return folder / (REFLECTION_PHASE_ADAPTER if name == TWO_STAGE_REFLECTION_PHASE else "adapter")


def finished_variants(params: Params, manifest: dict[str, Any]) -> list[str]:
    """The trained variants whose stage finished in this run (``eval.variants: trained``)."""
    stages = manifest.get("stages", {})
    done = {kind for kind, key in (("sft", "03_sft"), ("dpo", "04_dpo")) if stages.get(key, {}).get("status") == "done"}
    return [name for name in trained_variants(params) if name.split("/")[0] in done]


def plan_variants(params: Params, run_dir: Path, manifest: dict[str, Any] | None = None, *,
                  dpo_base: ModelParams | None = None) -> list[Variant]:
    """The variants ``eval.variants`` asks for, with their roles; a trained variant whose adapter is
    missing is an error here, before any model loads."""
    manifest = manifest or {}
    wanted = list(BASELINES) + finished_variants(params, manifest) if params.eval.variants == "trained" else list(params.eval.variants)
    variants = []
    for name in wanted:
        adapter = reflector = None
        if name not in BASELINES:
            adapter, reflector = variant_folder(run_dir, name) / "adapter", reflector_adapter(run_dir, name)
            for folder in dict.fromkeys([adapter, reflector]):
                if not (folder / "adapter_config.json").is_file():
                    stage = "03_sft" if name.startswith("sft/") else "04_dpo"
                    raise EvaluationError(f"eval.variants names {name}, but {folder} holds no trained adapter; run stage "
                                          f"{stage} first (reflectevo run PARAMS --from {stage[:2]}) or leave {name} out of "
                                          "eval.variants")
        variants.append(make_variant(params, name, adapter, dpo_base if name.startswith("dpo/") and dpo_base else params.model,
                                     reflector_adapter=reflector))
    return variants


def make_variant(params: Params, name: str, adapter: Path | None = None, model: ModelParams | None = None, *,
                 reflector_adapter: Path | None = None) -> Variant:
    """The roles of one variant (``retry``, ``base``, ``sft/<mode>``, ``dpo/<pairs>``,
    :data:`TWO_STAGE_REFLECTION_PHASE`); a trained variant's adapter sits on ``model`` (the base model unless
    DPO started from a merged SFT model). ``reflector_adapter``, when another adapter than ``adapter``
    reflects (two-stage SFT's reflection phase), plays the reflector."""
    base = ModelRef(BASE, params.model)
    if name == "retry":
        return Variant(name, base, None, base)
    if name == BASE:
        return Variant(name, base, base, base)
    if adapter is None:
        raise EvaluationError(f"variant {name} needs its adapter folder")
    kind, mode = name.split(":")[0].split("/")
    own = ModelRef(name.split(":")[0], model or params.model, Path(adapter))
    if name == "sft/qa_pairs":
        return Variant(name, own, None, None)
    first = own if params.eval.first_turn == "variant" else base
    if mode == "one_stage":
        return Variant(name, first, own, None, one_stage=True)
    if name == TWO_STAGE_REFLECTION_PHASE and reflector_adapter is None:
        reflector_adapter = Path(adapter).parent / REFLECTION_PHASE_ADAPTER
    reflector = own
    if reflector_adapter is not None and Path(reflector_adapter) != Path(adapter):
        reflector = ModelRef(name, model or params.model, Path(reflector_adapter))
    second_role = params.eval.second_turn_after_sft if kind == "sft" else params.eval.second_turn_after_dpo
    return Variant(name, first, reflector, own if second_role == "variant" else base)


def roles_table(variants: Sequence[Variant]) -> Any:
    """One row per variant: who answers the first turn, who reflects (and with which adapter), who answers the second turn."""
    import pandas as pd

    rows = []
    for variant in variants:
        roles = variant.roles()
        second = roles["second_turn"] or "—"
        if variant.one_stage:
            second += " (in the reflection's output)"
        rows.append({"variant": variant.name, "first turn": roles["first_turn"], "reflector": roles["reflector"] or "—",
                     "second turn": second, "adapter": str(variant.reflector.adapter) if variant.reflector and variant.reflector.adapter
                     else (str(variant.first_turn.adapter) if variant.first_turn.adapter else "—")})
    return pd.DataFrame(rows).set_index("variant")


# ---- models: each base loaded once, its adapters switched by name ----------------------------------
class ModelPool:
    """Loads each base model once and every adapter onto it under its own name; :meth:`active` gives
    the engine that generates with one adapter active, or with none (the base model)."""

    def __init__(self, params: Params, *, progress: bool = True, on_engine: Callable[[Any], Any] | None = None) -> None:
        if params.model.adapter:
            raise EvaluationError(f"model.adapter is set ({params.model.adapter}); evaluation attaches the trained variants' "
                                  "adapters to the base model itself: unset it, and evaluate an adapter with "
                                  "`reflectevo eval PARAMS --adapter PATH` or as a trained variant")
        if params.generation.engine in ("vllm", "replay"):
            raise EvaluationError(f"evaluation switches LoRA adapters on a loaded model; generation.engine "
                                  f"{params.generation.engine!r} cannot, use auto, transformers or unsloth")
        self.params, self.progress = params, progress
        self.on_engine = on_engine  # applied to every engine made (reflectevo.distributed: data-parallel generation)
        self.loaded: dict[str, Any] = {}  # base key -> LoadedModel (its model a PeftModel once adapters are on)
        self.engines: dict[str, Any] = {}
        self.adapters: dict[str, dict[Path, str]] = {}  # base key -> adapter folder -> adapter name

    def prepare(self, refs: Sequence[ModelRef]) -> None:
        """Load every base and attach every adapter the refs need (engines are made afterwards, once)."""
        from reflectevo.generation import make_engine
        from reflectevo.models import load_model

        for ref in refs:
            if ref.base_key not in self.loaded:
                self.loaded[ref.base_key] = load_model(ref.base.model_copy(update={"adapter": None}))
                self.adapters[ref.base_key] = {}
            names = self.adapters[ref.base_key]
            if ref.adapter is not None and ref.adapter not in names:
                names[ref.adapter] = self._attach(ref.base_key, ref.adapter, f"adapter{len(names)}")
                self.engines.pop(ref.base_key, None)  # the first adapter wraps the model: a new engine must see it
        for base_key, loaded in self.loaded.items():
            if base_key not in self.engines:
                engine = make_engine(self.params.generation, loaded, progress=self.progress)
                self.engines[base_key] = self.on_engine(engine) if self.on_engine is not None else engine

    def _attach(self, base_key: str, adapter: Path, name: str) -> str:
        from peft import PeftModel

        loaded = self.loaded[base_key]
        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(str(adapter), adapter_name=name)
        else:
            loaded.model = PeftModel.from_pretrained(loaded.model, str(adapter), adapter_name=name)
        loaded.model.eval()
        return name

    def describe(self) -> dict[str, Any]:
        return {base: {"backend": loaded.backend, "dtype": loaded.dtype, "device": loaded.device,
                       "engine": self.engines[base].name if base in self.engines else None,
                       "adapters": {str(path): name for path, name in self.adapters[base].items()}}
                for base, loaded in self.loaded.items()}

    @contextlib.contextmanager
    def active(self, ref: ModelRef) -> Iterator[Any]:
        """The engine of ``ref``'s base with ``ref``'s adapter active (all adapters off for a base ref)."""
        self.prepare([ref])
        model, engine = self.loaded[ref.base_key].model, self.engines[ref.base_key]
        if ref.adapter is None:
            disable = getattr(model, "disable_adapter", None)
            with disable() if disable is not None else contextlib.nullcontext():
                yield engine
        else:
            model.set_adapter(self.adapters[ref.base_key][ref.adapter])
            yield engine


# ---- protocols --------------------------------------------------------------------------------------
def oracle_graders(params: Params) -> list[str]:
    """The graders the oracle protocol runs under, once each, gated by that grader. A fixed order
    (official before robust), so a grader's generation store is planned the same way whatever order
    ``eval.graders`` lists them in."""
    return [grader for grader in GRADERS if grader in params.eval.graders]


def protocol_runs(params: Params) -> list[tuple[str, str | None]]:
    """(protocol, gating grader) of every evaluation each variant gets: the oracle once per grader of
    :func:`oracle_graders`, every other protocol once (its gate is no grader)."""
    return [(protocol, grader) for protocol in params.eval.protocols
            for grader in (oracle_graders(params) if protocol == "oracle" else [None])]


# ---- one turn of many questions -------------------------------------------------------------------
@dataclass
class Turn:
    """One generated answer and its verdict under every grader."""

    text: str
    verdicts: dict[str, Verdict]
    prompt: str = ""

    def to_dict(self, graders: Sequence[str]) -> dict[str, Any]:
        return {"text": self.text, **{g: graded(self.verdicts[g]) for g in graders}}


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
        lengths = {"attempt": ev.max_new_tokens, "thought": ev.max_new_tokens, "reflection": ev.reflection_max_new_tokens,
                   "one_stage": ev.reflection_max_new_tokens + ev.max_new_tokens}
        stop = {"reflection": (), "thought": THOUGHT_STOP}.get(kind, ATTEMPT_STOP)
        return GenerationSettings.from_params(self.params.generation, n=1, stop=stop, seed=self.params.run.seed,
                                              max_new_tokens=lengths[kind])

    def generate(self, ref: ModelRef, requests: dict[str, str | list[dict[str, Any]]], kind: str, store: str,
                 reuse: dict[tuple[str, ...], Any] | None = None) -> dict[str, Any]:
        """``{key: GenerationOutput}`` for ``{key: user message or chat messages}``, generated by ``ref``.

        ``reuse`` maps (model, kind, key, messages) to an output generated earlier in the same evaluation:
        a request found there is not generated again (the oracle under a second grader asks the same
        question with the same prompt wherever the graders agree), and new outputs are added to it."""
        if not requests:
            return {}
        started = time.perf_counter()
        messages = {key: [{"role": "user", "content": value}] if isinstance(value, str) else value
                    for key, value in requests.items()}

        def reuse_key(key: str) -> tuple[str, ...]:
            return (ref.key, kind, key, json.dumps(messages[key], ensure_ascii=False, sort_keys=True))

        found = {key: reuse[reuse_key(key)] for key in messages if reuse is not None and reuse_key(key) in reuse}
        wanted = [GenerationRequest(key, value) for key, value in messages.items() if key not in found]
        outputs = []
        if wanted:
            store_dir = self.store_dir / store if self.store_dir is not None else None
            with self.pool.active(ref) as engine:
                outputs = engine.generate(wanted, self._settings(kind), stage=store.replace("/", "_"), store_dir=store_dir,
                                          force=self.force)
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
                for key, verdict in zip(keys, task.grade_many([items[k] for k in keys], [texts[k] for k in keys], grader, self.sandbox)):
                    verdicts[key][grader] = verdict
        return self.share_verdicts(verdicts) if self.share_verdicts is not None else verdicts

    def attempts(self, ref: ModelRef, items: dict[str, Item], users: dict[str, str], store: str,
                 reuse: dict[tuple[str, ...], Any] | None = None) -> dict[str, Turn]:
        """Attempts for ``{key: user message}``, graded: one call that ends at the action line, or, with
        ``eval.attempt_calls: 2``, the paper's two calls (the thought, then the action with the thought given),
        as stage 02 makes them with ``reflect.attempt_calls``."""
        if self.params.eval.attempt_calls == 1:
            outputs = self.generate(ref, users, "attempt", store, reuse)
            texts = {key: output.text.strip() for key, output in outputs.items()}
        else:
            thoughts = self.generate(ref, {key: thought_messages(user) for key, user in users.items()}, "thought",
                                     f"{store}/thought", reuse)
            outputs = self.generate(ref, {key: action_messages(user, thoughts[key].text) for key, user in users.items()},
                                    "attempt", f"{store}/action", reuse)
            texts = {key: join_two_calls(thoughts[key].text, output.text) for key, output in outputs.items()}
        verdicts = self.grade(items, texts)
        return {key: Turn(texts[key], verdicts[key], outputs[key].prompt) for key in texts}

    def first_turn(self, ref: ModelRef, items: dict[str, Item]) -> dict[str, Turn]:
        """The first turns of ``ref`` on every item, generated once per first-turn model."""
        if ref.key not in self.first_turns:
            users = {key: attempt_prompt(get_task(item.task), item, self.params.eval.fewshots) for key, item in items.items()}
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

    def evaluate_gated(self, variant: Variant, protocol: str, items: dict[str, Item], gate_grader: str | None,
                       where: str, reuse: dict[tuple[str, ...], Any] | None = None) -> list[dict[str, Any]]:
        """``variant`` under ``protocol``; under the oracle, ``gate_grader`` decides who reflects and its feedback is shown."""
        ev = self.params.eval
        oracle = protocol == "oracle"
        first = self.first_turn(variant.first_turn, items)
        gate = {key: ("none" if not variant.has_second_turn else "grader" if oracle
                      else "always" if protocol == "oracle_free" else "self_verify") for key in items}
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
        second: dict[str, Turn] = {}
        if variant.reflector is not None and chosen:
            users = {}
            for key in chosen:
                item, attempt = items[key], first[key].text
                user = reflection_prompt(item, attempt, feedback[key], GENERIC_INSTRUCTION) if oracle else review_prompt(item, attempt)
                users[key] = with_one_stage_suffix(get_task(item.task), user) if variant.one_stage else user
            outputs = self.generate(variant.reflector, users, "one_stage" if variant.one_stage else "reflection",
                                    f"{where}/reflection", reuse)
            if variant.one_stage:
                split = {key: split_one_stage(output.text) for key, output in outputs.items()}
                reflections = {key: parts[0] for key, parts in split.items()}
                texts = {key: (parts[1] or "") for key, parts in split.items()}  # no "Answer:": a parse failure
                verdicts = self.grade(items, texts)
                second = {key: Turn(texts[key], verdicts[key], outputs[key].prompt) for key in texts}
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
        return [self.prediction(variant, protocol, items[key], first[key], gate[key], self_checks.get(key), key in second,
                                reflections.get(key), second.get(key), gate_grader) for key in items]

    def prediction(self, variant: Variant, protocol: str, item: Item, first: Turn, gate: str, self_check: tuple | None,
                   reflected: bool, reflection: str | None, second: Turn | None, gate_grader: str | None = None) -> dict[str, Any]:
        graders = self.params.eval.graders
        standing = second if second is not None else first
        return {
            "variant": variant.name, "protocol": protocol, "task": item.task, "id": item.id,
            "question": item.question, "gold": item.gold, "breakdown": breakdown_of(item), "roles": variant.roles(),
            "t1": first.to_dict(graders), "reflected": reflected,
            "gate": {"by": gate, "self_verify_text": self_check[0] if self_check else None,
                     "self_verdict": self_check[1] if self_check else None},
            "reflection": reflection, "t2": second.to_dict(graders) if second is not None else None,
            "final": {g: standing.verdicts[g].outcome for g in graders} if variant.has_second_turn else None,
            # under the oracle, the grader that gated this row: its tables score the row under that grader only
            "gate_grader": gate_grader,
            "versions": self.versions(item.task),
        }

    @staticmethod
    def versions(task: str) -> dict[str, str]:
        return {"task": get_task(task).version, "prompts": PROMPT_VERSION, "reflection": REFLECTION_VERSION,
                "review": REVIEW_VERSION}

    def run(self, variants: Sequence[Variant], items_by_task: dict[str, list[Item]]) -> list[dict[str, Any]]:
        """Every variant under every protocol of ``eval.protocols``; first turns are shared."""
        items = {f"{item.task}/{item.id}": item for task_items in items_by_task.values() for item in task_items}
        if not items:
            raise EvaluationError(f"no {self.params.eval.split} items to evaluate (tasks {sorted(items_by_task)}); "
                                  "check data.max_items and data.tasks")
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
    from reflectevo.pipeline import make_sandbox

    sandbox = make_sandbox(params, params.data.tasks)
    return Evaluator(params, ModelPool(params, progress=progress), store_dir, sandbox=sandbox, force=force)


def dpo_base_model(params: Params, run: Any) -> ModelParams | None:
    """The base the DPO adapters sit on when ``dpo.start_from`` names an SFT variant: its merged model
    (merged again if its folder was removed). None when DPO starts from the base or has not run."""
    if params.dpo.start_from == "base" or run.manifest().get("stages", {}).get("04_dpo", {}).get("status") != "done":
        return None
    from reflectevo.training import dpo_start

    model, _ = dpo_start(params, run, main=True)
    return model


# What the generated text depends on. Not the reported graders, the bootstrap or the list of variants
# and protocols (each variant, protocol and oracle grader has its own store): changing those reuses every
# generation already made.
GENERATION_KEYS = ("run.seed", "model", "generation", "eval.split", "eval.first_turn", "eval.second_turn_after_sft",
                   "eval.second_turn_after_dpo", "eval.second_trial", "eval.fewshots", "eval.attempt_calls",
                   "eval.max_new_tokens", "eval.reflection_max_new_tokens")


def generations_dir(stage_dir: Path, params: Params, manifest: dict[str, Any]) -> Path:
    """Where stage 05's generation stores live: named after the params the text depends on and the
    identities of the data and the trained adapters, so other settings start afresh beside them."""
    from reflectevo.config import canonical_hash

    stages = manifest.get("stages", {})
    upstream = {key: stages.get(key, {}).get("identity") for key in ("01_data", "03_sft", "04_dpo")}
    return stage_dir / "generations" / canonical_hash({"params": params.section_hash(GENERATION_KEYS), "upstream": upstream})[:12]


def pick_example(predictions: Sequence[dict[str, Any]], variant: str = BASE) -> list[dict[str, Any]]:
    """One question under every protocol for ``variant``: preferably one whose first answer was wrong and
    whose final answer differs between protocols (it shows the most), else any that was reflected on."""
    by_item: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in predictions:
        if row["variant"] == variant:
            by_item.setdefault((row["task"], row["id"]), []).append(row)

    def score(rows: list[dict[str, Any]]) -> int:
        finals = {str(row["final"]) for row in rows}
        return 2 * (len(finals) > 1) + any(row["reflected"] for row in rows)

    return max(by_item.values(), key=score) if by_item else []


def format_example(rows: Sequence[dict[str, Any]], grader: str = "official", max_chars: int = 500) -> str:
    """A question, its first answer, then per protocol: the gate, the reflection and the second answer."""
    def clip(text: str | None) -> str:
        text = (text or "").strip()
        return text if len(text) <= max_chars else text[:max_chars] + " ..."

    if not rows:
        return "(no predictions)"
    first = rows[0]
    lines = [f"[{first['task']} / {first['id']}]  gold: {clip(first['gold'])}", f"QUESTION\n{clip(first['question'])}",
             f"FIRST ANSWER ({first['t1'][grader]['outcome']})\n{clip(first['t1']['text'])}"]
    for row in rows:
        gate = row["gate"]
        protocol = row["protocol"] + (f" gated by {row['gate_grader']}" if row.get("gate_grader") else "")
        lines.append(f"--- protocol {protocol}: reflected: {row['reflected']} (gate: {gate['by']}"
                     + (f", self-verdict {gate['self_verdict']}" if gate["by"] == "self_verify" else "") + ")")
        if row["reflection"] is not None:
            lines.append(f"REFLECTION\n{clip(row['reflection'])}")
        if row["t2"] is not None:
            lines.append(f"SECOND ANSWER ({row['t2'][grader]['outcome']})\n{clip(row['t2']['text'])}")
    return "\n\n".join(lines)



# ---- the tables and files of stage 05 -------------------------------------------------------------
@dataclass
class EvalTables:
    """Every table stage 05 reports, computed from the predictions by :mod:`reflectevo.metrics`."""

    frame: Any  # one row per prediction and grader
    summary: Any  # per variant x protocol x grader x task (+ overall): accuracies, flips, parse failures, CIs
    comparisons: Any  # every variant against ``base`` on the same items: difference, CI, McNemar, verdict
    paper: dict[tuple[str, str], Any]  # (protocol, grader) -> the paper's layout
    breakdowns: dict[str, Any]  # "answer_type" (BIG-bench), "level" and "subject" (MATH)
    transitions: Any  # long: variant, protocol, grader, t1 outcome, final outcome, items
    excluded_tasks: list[str] = field(default_factory=list)  # tasks of data.tasks left out (data.allow_empty_eval)

    def paper_view(self, protocol: str, grader: str) -> Any:
        return self.paper[(protocol, grader)]


def compute_tables(predictions: Sequence[dict[str, Any]], params: Params, *,
                   excluded_tasks: Sequence[str] = ()) -> EvalTables:
    """Every table of stage 05. ``excluded_tasks`` (tasks of ``data.tasks`` with no eval items, left out
    where ``data.allow_empty_eval`` allows it) are named on every ``overall`` row of the summary, whose
    pool they are not in, and under every paper-layout table."""
    import pandas as pd

    from reflectevo import metrics

    ev = params.eval
    frame = metrics.prediction_frame(predictions, graders=ev.graders)
    options = {"bootstrap_samples": ev.bootstrap_samples, "confidence": ev.confidence, "seed": params.run.seed}
    summary = metrics.summarize(frame, **options)
    if excluded_tasks:
        summary["tasks_left_out"] = [", ".join(excluded_tasks) if task == metrics.OVERALL else "" for task in summary["task"]]
    comparisons = (metrics.compare_variants(frame, reference=BASE, **options) if BASE in set(frame["variant"])
                   else pd.DataFrame(columns=["variant", "reference", "protocol", "grader", "task", *metrics.COMPARISON_FIELDS]))
    paper = {(protocol, grader): metrics.paper_table(summary, protocol=protocol, grader=grader)
             for protocol in dict.fromkeys(frame["protocol"]) for grader in dict.fromkeys(frame["grader"])}
    breakdowns = {column: metrics.breakdown(frame, column, **options) for column in metrics.BREAKDOWN_KEYS
                  if frame[column].notna().any()}
    rows = []
    for (variant, protocol, grader), part in frame.groupby(["variant", "protocol", "grader"], sort=False):
        if part["t2"].isna().all():
            continue
        matrix = metrics.transition_matrix(part)
        rows += [{"variant": variant, "protocol": protocol, "grader": grader, "t1": t1, "final": t2, "items": int(count)}
                 for t1, counts in matrix.iterrows() for t2, count in counts.items()]
    transitions = pd.DataFrame(rows, columns=["variant", "protocol", "grader", "t1", "final", "items"])
    return EvalTables(frame, summary, comparisons, paper, breakdowns, transitions, list(excluded_tasks))


def eval_record(params: Params, variants: Sequence[Variant], items_by_task: dict[str, list[Item]],
                evaluator: Evaluator | None = None, *, excluded_tasks: Sequence[str] = ()) -> dict[str, Any]:
    """What produced the numbers: protocols, graders, roles, prompt versions and texts, seed, bootstrap."""
    from reflectevo import prompts

    ev = params.eval
    return {
        "split": ev.split, "items": {task: len(rows) for task, rows in items_by_task.items()},
        "excluded_tasks": list(excluded_tasks),  # in data.tasks, no eval items, left out (data.allow_empty_eval)
        "protocols": ev.protocols, "graders": ev.graders,
        # the oracle ran once per grader, gated by it; its tables score each run by its own grader only
        "oracle_graders": oracle_graders(params),
        "attempt_calls": ev.attempt_calls,
        # settings where training and test inputs differ because the recipe says so (eval.allow_mismatch)
        "allowed_mismatches": training_test_mismatches(params, allowed=True),
        "roles": {variant.name: variant.roles() for variant in variants},
        "adapters": {variant.name: str(ref.adapter) for variant in variants
                     for ref in (variant.reflector, variant.first_turn) if ref is not None and ref.adapter is not None},
        "second_trial": ev.second_trial, "fewshots": ev.fewshots, "seed": params.run.seed,
        "generation": {"temperature": params.generation.temperature, "top_p": params.generation.top_p,
                       "max_new_tokens": ev.max_new_tokens, "reflection_max_new_tokens": ev.reflection_max_new_tokens},
        "bootstrap_samples": ev.bootstrap_samples, "confidence": ev.confidence,
        "versions": {"tasks": {task: get_task(task).version for task in items_by_task}, "prompts": prompts.PROMPT_VERSION,
                     "reflection": prompts.REFLECTION_VERSION, "review": prompts.REVIEW_VERSION},
        "oracle_free_wording": {"review": prompts.REVIEW_INTRO, "review_header": prompts.REVIEW_HEADER,
                                "previous_attempt": prompts.PREVIOUS_ATTEMPT, "self_verify": prompts.SELF_VERIFY_INTRO},
        "models": evaluator.pool.describe() if evaluator is not None else None,
    }  # no wall-clock times: results.json is byte-identical across reruns (the times go to the manifest)


def write_results(out_dir: Path, predictions: Sequence[dict[str, Any]], tables: EvalTables, record: dict[str, Any]) -> list[Path]:
    """Write the predictions and every table (CSV, the paper's layout also as Markdown) into ``out_dir``,
    each file whole (written to a temporary name, then renamed)."""
    from reflectevo.analysis import markdown_table
    from reflectevo.jsonl import write_jsonl_atomic
    from reflectevo.runs import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    written = [write_jsonl_atomic(out_dir / PREDICTIONS_FILE, predictions)]
    for name, table in (("summary", tables.summary), ("comparisons", tables.comparisons), ("transitions", tables.transitions),
                        *((f"breakdown_{column}", table) for column, table in tables.breakdowns.items())):
        written.append(atomic_write_text(out_dir / f"{name}.csv", table.to_csv(index=False)))
    for (protocol, grader), table in tables.paper.items():
        stem = out_dir / f"paper_table_{protocol}_{grader}"
        written.append(atomic_write_text(stem.with_suffix(".csv"), table.to_csv()))
        note = (f"\nLeft out, with no {record['split']} items (data.allow_empty_eval): {', '.join(tables.excluded_tasks)}.\n"
                if tables.excluded_tasks else "")
        written.append(atomic_write_text(stem.with_suffix(".md"), markdown_table(table) + "\n" + note))
    written.append(atomic_write_json(out_dir / "results.json", {**record, "summary": tables.summary.to_dict(orient="records")}))
    return written


# ---- `reflectevo eval`: any model or adapter, without the rest of the pipeline ----------------------
def slug(text: str) -> str:
    """A folder name for a model id or path: its last two components, other characters as '-'."""
    import re

    parts = [part for part in str(text).replace("\\", "/").split("/") if part and part != "adapter"][-2:]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts)).strip("-") or "model"


def evaluate_model(params: Params, *, adapter: str | None = None, adapter_as: str = "sft/two_stage",
                   variants: Sequence[str] | None = None, out_dir: Path | None = None, progress: bool = True) -> tuple[Path, EvalTables]:
    """Evaluate ``params.model`` (and an adapter, playing the roles of the variant ``adapter_as``) on the
    ``eval.split`` items of ``data.tasks``, split exactly as stage 01 would split them, and write the
    results to ``out_dir`` (default ``outputs/<run>/eval-standalone/<model>[-<adapter>]``)."""
    from reflectevo.data.prepare import check_eval_splits, prepare_data

    if adapter is not None:
        from reflectevo.models import adapter_folder

        adapter_path = adapter_folder(adapter)  # checked before anything loads
        if adapter_as not in (*(f"sft/{m}" for m in ("one_stage", "two_stage", "qa_pairs")), "dpo/d_pm", "dpo/d_pref"):
            raise EvaluationError(f"--adapter-as must be a trained variant kind (sft/one_stage, sft/two_stage, sft/qa_pairs, "
                                  f"dpo/d_pm, dpo/d_pref), got {adapter_as!r}")
    names = list(variants) if variants else [*BASELINES, *([adapter_as] if adapter else [])]
    plan = []
    for name in names:
        if name in BASELINES:
            plan.append(make_variant(params, name))
        elif adapter is not None and name == adapter_as:
            plan.append(make_variant(params, name, adapter_path))
        else:
            raise EvaluationError(f"variant {name!r} is neither a baseline ({', '.join(BASELINES)}) nor the adapter's "
                                  f"role ({adapter_as if adapter else 'no --adapter given'})")
    data = prepare_data(params.data, params.run.seed)
    excluded = check_eval_splits(data, params)  # a task without eval items stops here, unless allowed
    items = {task: task_data.splits[params.eval.split] for task, task_data in data.items() if task not in excluded}
    if out_dir is None:
        out_dir = params.run_dir / "eval-standalone" / (slug(params.model.name) + (f"-{slug(adapter)}" if adapter else ""))
    out_dir = Path(out_dir)
    evaluator = make_evaluator(params, out_dir / "generations", progress=progress)
    predictions = evaluator.run(plan, items)
    tables = compute_tables(predictions, params, excluded_tasks=excluded)
    write_results(out_dir, predictions, tables, eval_record(params, plan, items, evaluator, excluded_tasks=excluded))
    return out_dir, tables
