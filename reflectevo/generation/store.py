"""The batch store: planned batches with their seeds, written one file per batch, resumed, sharded, merged."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reflectevo.core.files import atomic_write
from reflectevo.core.jsonl import read_jsonl, write_jsonl_atomic
from reflectevo.errors import GenerationError, StoreMismatchError
from reflectevo.generation.requests import GenerationOutput, GenerationRequest, GenerationSettings, check_requests

log = logging.getLogger(__name__)
PLAN_FILE = "plan.json"
PLAN_FIELDS = {
    "plan_sha256": "set of record keys or prompts",
    "num_batches": "number of batches",
    "prompts_per_batch": "batch size",
    "decoder": "decoder (engine.decoder_name(): outputs of two decoders are not mixed in one store)",
}  # plan.json fields, as the mismatch error names them
BATCH_FILE = re.compile(r"batch-(\d{5})-([0-9a-f]{12})\.jsonl")
BATCH_TEMP_FILE = re.compile(r"\.batch-(\d{5})-[0-9a-f]{12}\.jsonl\..*\.tmp")  # write_jsonl_atomic's temp name
SHARD_LEDGER = "shard-{index}-of-{count}.json"  # which batches one shard generated and resumed, last pass


@dataclass(frozen=True)
class Batch:
    """One unit of the plan: generated together, seeded together, committed together."""

    index: int
    keys: tuple[str, ...]
    prompts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]

    @property
    def file_name(self) -> str:
        digest = hashlib.sha256("\x1f".join(self.keys).encode("utf-8")).hexdigest()[:12]
        return f"batch-{self.index:05d}-{digest}.jsonl"


def batch_seed(seed: int, stage: str, first_key: str) -> int:
    """The 64-bit sampler seed of a batch: a function of the run seed, the stage and the batch's first key."""
    return hashed_seed(seed, stage, first_key)


def sample_seed(seed: int, stage: str, key: str, sample: int) -> int:
    """The 64-bit sampler seed of one sample of one record: a function of the run seed, the stage, the
    record key and the sample index, so a sample does not depend on the batch it runs in."""
    return hashed_seed(seed, stage, key, sample)


def hashed_seed(*parts: object) -> int:
    """64 bits of the sha256 of ``parts`` joined by the unit separator."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


# Prompts whose first GROUP_TOKENS tokens agree are planned side by side, so a batch's prompts share
# their opening and the decoder prefills it once. 64 tokens hold any chat template's opening and
# system message of the models we know, and a task's few-shot preamble diverges from another's
# within them; a longer shared system message puts every prompt in one group, which is the plain
# length sort.
GROUP_TOKENS = 64


def plan_batches(
    keys: Sequence[str],
    prompts: Sequence[str],
    token_ids: Sequence[Sequence[int]],
    prompts_per_batch: int,
    group_tokens: int = GROUP_TOKENS,
) -> list[Batch]:
    """Prompts grouped by their first ``group_tokens`` tokens (0: no groups), the group holding the
    longest prompt first (an out-of-memory error shows at once); within a group, longest first, ties
    by key; then fixed-size chunks."""
    longest: dict[tuple[int, ...], int] = {}
    for ids in token_ids:
        opening = tuple(ids[:group_tokens])
        longest[opening] = max(longest.get(opening, 0), len(ids))

    def place(i: int) -> tuple:
        opening = tuple(token_ids[i][:group_tokens])
        return (-longest[opening], opening, -len(token_ids[i]), keys[i])

    order = sorted(range(len(keys)), key=place)
    batches = []
    for start in range(0, len(order), prompts_per_batch):
        chunk = order[start : start + prompts_per_batch]
        batches.append(
            Batch(
                len(batches),
                tuple(keys[i] for i in chunk),
                tuple(prompts[i] for i in chunk),
                tuple(tuple(token_ids[i]) for i in chunk),
            )
        )
    return batches


# ---- the store: committed batches, resume, shards ------------------------------------------------
class BatchStore:
    """One JSONL file per finished batch plus ``plan.json``, the fingerprint every batch must match."""

    def __init__(self, folder: Path, num_shards: int, shard_index: int, force: bool) -> None:
        self.folder, self.num_shards, self.shard_index, self.force = folder, num_shards, shard_index, force

    def recorded_prompts_per_batch(self) -> int | None:
        path = self.folder / PLAN_FILE
        if self.force or not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8")).get("prompts_per_batch")

    def open(self, record: dict[str, Any], plan: list[Batch]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for temp in self.folder.iterdir():  # left by a killed writer of this shard; never results
            match = BATCH_TEMP_FILE.fullmatch(temp.name)
            if match and int(match.group(1)) % self.num_shards == self.shard_index:
                temp.unlink(missing_ok=True)
        plan_path = self.folder / PLAN_FILE
        if plan_path.is_file():
            self._check_recorded(record)
        names = {batch.file_name for batch in plan}
        strangers = [p.name for p in self.folder.iterdir() if BATCH_FILE.fullmatch(p.name) and p.name not in names]
        if strangers:
            self._mismatch(f"batch file(s) {strangers[:3]} do not belong to this plan (other keys)")
        if not plan_path.is_file() and not create_once(plan_path, json.dumps(record, ensure_ascii=False) + "\n"):
            self._check_recorded(record)  # another process of the same launch wrote it first: same plan?

    def _check_recorded(self, record: dict[str, Any]) -> None:
        recorded = json.loads((self.folder / PLAN_FILE).read_text(encoding="utf-8"))
        differing = sorted(name for name in set(record) | set(recorded) if record.get(name) != recorded.get(name))
        if differing:
            described = ", ".join(PLAN_FIELDS.get(name, name) for name in differing)
            self._mismatch(f"it was planned with a different {described}")

    def _mismatch(self, why: str) -> None:
        if not self.force:
            raise StoreMismatchError(
                f"{self.folder} holds generation outputs of a different plan: {why}. "
                "Use a new run name, or force (--force) to discard them and generate again"
            )
        log.warning("discarding the outputs in %s: %s", self.folder, why)
        for path in self.folder.iterdir():
            if BATCH_FILE.fullmatch(path.name) or path.name == PLAN_FILE:
                path.unlink()

    def committed(
        self, plan: list[Batch], settings: GenerationSettings, stage: str
    ) -> dict[int, list[GenerationOutput]]:
        """The finished batches of this shard; a damaged file is removed and its batch generated again."""
        done = {}
        for batch in plan:
            path = self.folder / batch.file_name
            if batch.index % self.num_shards != self.shard_index or not path.is_file():
                continue
            try:
                outputs = [GenerationOutput.from_dict(row) for _line, row in read_jsonl(path)]
            except (ValueError, TypeError) as exc:
                log.warning("ignoring damaged batch file %s (%s); generating it again", path, exc)
                path.unlink()
                continue
            if not self._matches(batch, outputs, settings, stage):
                why = f"{path.name} holds other keys, samples or settings than the plan's batch {batch.index}"
                if not self.force:
                    self._mismatch(why)
                log.warning("discarding %s: %s", path, why)
                path.unlink()
                continue
            done[batch.index] = outputs
        return done

    @staticmethod
    def _matches(batch: Batch, outputs: list[GenerationOutput], settings: GenerationSettings, stage: str) -> bool:
        expected = [(key, sample) for key in batch.keys for sample in range(settings.n)]
        found = [(o.key, o.sample) for o in outputs]
        return found == expected and all(o.settings == settings.to_dict() and o.stage == stage for o in outputs)

    def read_plan(
        self, plan: list[Batch], settings: GenerationSettings, stage: str
    ) -> dict[int, list[GenerationOutput]]:
        """Every batch of the plan, whichever process committed it (after all of them finished their
        shares); a batch that is not there, or not whole, is an error: nothing can regenerate it now."""
        done, missing = {}, []
        for batch in plan:
            path = self.folder / batch.file_name
            if not path.is_file():
                missing.append(batch.index)
                continue
            try:
                outputs = [GenerationOutput.from_dict(row) for _line, row in read_jsonl(path)]
            except (ValueError, TypeError) as exc:
                raise GenerationError(f"{path} cannot be read ({exc}); delete it and generate again") from None
            if not self._matches(batch, outputs, settings, stage):
                raise GenerationError(
                    f"{path} holds other keys, samples or settings than the plan's batch {batch.index}; "
                    "were all processes started with the same params?"
                )
            done[batch.index] = outputs
        if missing:
            raise GenerationError(
                f"{len(missing)} of the {len(plan)} {stage} batches are not in {self.folder} after every process finished "
                f"its share (e.g. batch {missing[0]}, shard {missing[0] % self.num_shards}). The processes exchange batches "
                "through this folder: run.output_dir must be on a file system that every machine of the launch shares"
            )
        return done

    def write_ledger(self, stage: str, mine: list[Batch], done: dict[int, list[GenerationOutput]]) -> None:
        """Record which batches this shard generated and which it found committed (its last pass):
        who produced what, when several processes or machines share the store."""
        ledger = {
            "stage": stage,
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "generated": [batch.index for batch in mine if batch.index not in done],
            "resumed": [batch.index for batch in mine if batch.index in done],
        }
        write_jsonl_atomic(self.folder / SHARD_LEDGER.format(index=self.shard_index, count=self.num_shards), [ledger])

    def commit(self, batch: Batch, outputs: list[GenerationOutput]) -> None:
        write_jsonl_atomic(self.folder / batch.file_name, (output.to_dict() for output in outputs))


def create_once(path: Path, text: str) -> bool:
    """Put ``text`` at ``path`` unless a file is there already; True when this call wrote it.

    Processes racing to create the same file: exactly one wins, and none ever reads half a file (it
    is written under a temporary name, then hard-linked into place, which fails if ``path`` exists).
    """

    def link_unless_there(tmp: Path, target: Path) -> bool:
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: a rename, whose last writer wins
            if target.exists():
                return False
            os.replace(tmp, target)
            return True

    return atomic_write(path, lambda handle: handle.write(text), mode="w", publish=link_unless_there)


def load_store(store_dir: str | Path) -> list[GenerationOutput]:
    """Every committed output in a store folder, in plan order (batch by batch)."""
    folder = Path(store_dir)
    files = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := BATCH_FILE.fullmatch(p.name)))
    return [GenerationOutput.from_dict(row) for _index, path in files for _line, row in read_jsonl(path)]


def merge_shards(
    parts: Iterable[Iterable[GenerationOutput]], requests: Sequence[GenerationRequest]
) -> list[GenerationOutput]:
    """Combine the outputs of whole-batch shards into what one unsharded run returns (request order)."""
    slots: dict[tuple[str, int], GenerationOutput] = {}
    for part in parts:
        for output in part:
            slot = (output.key, output.sample)
            if slot in slots and slots[slot] != output:
                raise GenerationError(
                    f"key {output.key!r} sample {output.sample} differs between shards; were they run with the same params?"
                )
            slots[slot] = output
    wanted = {request.key for request in check_requests(requests)}
    missing = sorted(wanted - {key for key, _ in slots})
    if missing:
        raise GenerationError(
            f"{len(missing)} request key(s) are in no shard, e.g. {missing[:3]}; run the missing shards first"
        )
    position = {request.key: i for i, request in enumerate(requests)}
    return sorted((o for o in slots.values() if o.key in wanted), key=lambda o: (position[o.key], o.sample))


def write_outputs(path: str | Path, outputs: Iterable[GenerationOutput]) -> Path:
    return write_jsonl_atomic(path, (output.to_dict() for output in outputs))


def read_outputs(path: str | Path) -> list[GenerationOutput]:
    return [GenerationOutput.from_dict(row) for _line, row in read_jsonl(path)]
