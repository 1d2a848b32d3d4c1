"""Stage 01: load the tasks named in params, give every item a split, write them into the run.

Where items come from (``data.source``, and ``data.test_source`` for the test split alone):

* ``samples``: the built-in items, which keep their fixed train / validation / test roles;
* ``official``: the paper's 500-item test files in ``data.official_dir``, checked against their
  sha256 at the paper's commit; they carry no split, so a seeded shuffle cuts them by
  ``data.split_fractions`` (or all of them are the test split when they are the ``test_source``);
* ``hub``: the hub datasets, split by split as the hub provides them (``Task.hub_splits``). A hub
  dataset without a test split (BIG-bench) has one cut out of its validation split (its train split
  when it has no validation split) by a seeded shuffle: the two share it in the ratio of
  ``data.split_fractions.validation`` to ``.test`` (half each by default). Moved items keep their
  ids (``validation-17``); ``summary.json`` records the cut under ``test_cuts``.

Paper replication is ``source: hub, test_source: official``: reflections on hub training data, the
evaluation on the full official files, so N = 500 per task as in the paper.

The contamination guard (``data.decontaminate``, on by default) then compares every train and
validation item with every test item of the same task, whatever the sources, and drops the ones that
are the same question (:func:`content_keys`): 332 official BIG-bench test rows come from the VitaminC
task whose hub train and validation splits the hub loader reads, under ids that never clash. It runs before ``data.max_items`` caps the splits, so it compares
against every test item the test split is drawn from.

An empty evaluated split is refused by :func:`check_eval_splits` unless ``data.allow_empty_eval``
names the task; stage 05 asks :func:`eval_exclusions` which tasks it leaves out.

Written under ``outputs/<run>/data/``: ``<task>/<split>.jsonl`` (the unified item schema),
``dataset/`` (the same items as a ``datasets.DatasetDict``, metadata as a JSON string column) and
``summary.json`` (:func:`data_summary`: counts, sources, file hashes, the guard's drops, test cuts
and the tasks allowed to have no items to evaluate).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflectevo.config import DataParams, Params, SplitFractions
from reflectevo.core.files import atomic_directory, atomic_write_json, file_sha256
from reflectevo.core.jsonl import read_jsonl
from reflectevo.core.seeds import derive_seed
from reflectevo.errors import DataError, DataFileNotFound
from reflectevo.tasks import SPLITS, Item, get_task
from reflectevo.tasks.base import check_unique_ids, write_items

DATASET_COLUMNS = ("task", "id", "question", "gold", "options", "tests", "setup_code", "split", "source_id", "metadata")


@dataclass
class TaskData:
    """The items of one task, by split, and where they came from."""

    task: str
    splits: dict[str, list[Item]] = field(default_factory=lambda: {split: [] for split in SPLITS})
    # split -> "samples" | "official:<file>" | "hub:<id>", with the origin of a test split cut from a hub split
    sources: dict[str, str] = field(default_factory=dict)
    input_hashes: dict[str, str] = field(default_factory=dict)  # file -> sha256
    decontaminated: bool = False  # whether the contamination guard ran (data.decontaminate)
    # split -> {id of a dropped train/validation item: id of the test item it matches}
    dropped: dict[str, dict[str, str]] = field(default_factory=lambda: {"train": {}, "validation": {}})
    test_cut: dict[str, Any] | None = None  # how the test split was cut from a hub split, when it was
    allow_empty_eval: bool = False  # data.allow_empty_eval names this task

    def counts(self) -> dict[str, int]:
        return {split: len(items) for split, items in self.splits.items()}


def split_seed(seed: int, task: str, purpose: str) -> int:
    """A seed per (run seed, task, purpose), so adding a task never reshuffles another one."""
    return derive_seed(seed, task, purpose)


def load_official_checked(
    task_name: str, official_dir: str | Path, check_sha256: bool = True
) -> tuple[list[Item], str]:
    """The official test file of a task, refused when its sha256 is not the paper's."""
    task = get_task(task_name)
    path = Path(official_dir) / task.official_file
    if not path.is_file():
        raise DataFileNotFound(
            f"official file not found: {path}. Fetch {task.official_file} from the paper's repository "
            "(github.com/bigai-nlco/ReflectEvo, data/data_source/, commit 6634f923) into data.official_dir"
        )
    digest = file_sha256(path)
    if check_sha256 and task.official_sha256 and digest != task.official_sha256:
        raise DataError(
            f"{path} has sha256 {digest}, not the paper's {task.official_sha256} (commit 6634f923). "
            "Use the file from that commit, or set data.check_sha256: false to accept a modified file "
            "(the manifest records its hash)"
        )
    return task.load_official(path), digest


def load_source(task_name: str, source: str, params: DataParams) -> tuple[list[Item], str, dict[str, str]]:
    """Items of one task from one source: (items, a description of the source, input file hashes)."""
    task = get_task(task_name)
    if source == "samples":
        items = task.load_samples()
        return items, "samples", {}
    if source == "official":
        assert params.official_dir is not None  # the schema demands it
        items, digest = load_official_checked(task_name, params.official_dir, params.check_sha256)
        return (
            [_with_split(item, None) for item in items],
            f"official:{task.official_file}",
            {task.official_file: digest},
        )
    if source == "hub":
        options = dict(params.hub_options.get(task_name, {}))
        items = []
        for split in task.hub_splits:
            for item in task.load_hub(split=split, **options):
                # hub ids count rows per split; prefix the split so ids stay unique within the task
                items.append(
                    Item(
                        **{
                            **item.to_dict(),
                            "id": f"{split}-{item.id}",
                            "split": split,
                            "source_id": item.source_id or item.id,
                        }
                    )
                )
        return items, f"hub:{task.hub_dataset}", {}
    raise ValueError(f"unknown data source {source!r}")


def _with_split(item: Item, split: str | None) -> Item:
    return Item(**{**item.to_dict(), "split": split})


def assign_splits(items: list[Item], fractions: dict[str, float], seed: int) -> list[Item]:
    """Give items without a split one, by a seeded shuffle cut at the fractions (train, validation, test)."""
    loose = [item for item in items if item.split is None]
    if not loose:
        return items
    order = list(range(len(loose)))
    random.Random(seed).shuffle(order)
    n = len(loose)
    n_train = round(n * fractions["train"])
    n_validation = round(n * fractions["validation"])
    roles = {}
    for rank, index in enumerate(order):
        roles[index] = "train" if rank < n_train else "validation" if rank < n_train + n_validation else "test"
    assigned = iter(_with_split(item, roles[i]) for i, item in enumerate(loose))
    return [next(assigned) if item.split is None else item for item in items]


def cap(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """At most ``limit`` items, a seeded choice kept in source order (so the files read naturally)."""
    if limit is None or len(items) <= limit:
        return items
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def cut_hub_test_split(
    task_name: str, items: list[Item], fractions: SplitFractions, seed: int
) -> tuple[list[Item], dict[str, Any] | None]:
    """Give a hub dataset without a test split one: a seeded share of its validation split (of its
    train split when it has no validation split) becomes the test split.

    The split it is cut from and the test split share that split's items in the ratio of their
    ``split_fractions`` (validation 0.1 and test 0.1: half each). Returns the items and a record of
    the cut, or None where the hub has a test split or ``split_fractions.test`` is 0.
    """
    task = get_task(task_name)
    if "test" in task.hub_splits:
        return items, None
    origin = "validation" if "validation" in task.hub_splits else "train"
    shares = fractions.model_dump()
    total = shares[origin] + shares["test"]
    share = shares["test"] / total if total else 0.0
    if share == 0.0:
        return items, None
    cut_fractions = {"train": 0.0, "validation": 0.0, "test": share}
    cut_fractions[origin] = 1.0 - share
    loose = [_with_split(item, None) if item.split == origin else item for item in items]
    cut = assign_splits(loose, cut_fractions, split_seed(seed, task_name, "hub-test-cut"))
    moved = sum(1 for item in cut if item.split == "test")
    return cut, {
        "from_split": origin,
        "test_share": round(share, 6),
        "moved": moved,
        "kept": sum(1 for item in cut if item.split == origin),
        "seed_purpose": "hub-test-cut",
    }


def prepare_task(task_name: str, params: DataParams, seed: int) -> TaskData:
    data = TaskData(task_name, allow_empty_eval=task_name in params.allow_empty_eval)
    items, described, hashes = load_source(task_name, params.source, params)
    data.input_hashes.update(hashes)
    items = assign_splits(items, params.split_fractions.model_dump(), split_seed(seed, task_name, "split"))
    test_source = params.test_source
    separate_test = test_source is not None and test_source != params.source
    if params.source == "hub" and not separate_test:
        items, data.test_cut = cut_hub_test_split(task_name, items, params.split_fractions, seed)
    if separate_test:
        items = [item for item in items if item.split != "test"]
        test_items, test_described, test_hashes = load_source(task_name, test_source, params)
        data.input_hashes.update(test_hashes)
        if test_source == "official":
            test_items = [_with_split(item, "test") for item in test_items]  # the whole file is the test set
        else:
            if test_source == "hub":
                test_items, data.test_cut = cut_hub_test_split(task_name, test_items, params.split_fractions, seed)
            test_items = [item for item in test_items if item.split == "test"]
        clash = {item.id for item in items} & {item.id for item in test_items}
        if clash:
            raise DataError(
                f"{task_name}: test items from {test_source} reuse ids of {params.source} items: {sorted(clash)[:5]}"
            )
        items = items + test_items
        data.sources["test"] = test_described
    for split in SPLITS:
        data.sources.setdefault(split, described)
    if data.test_cut is not None:
        data.sources["test"] += f" ({data.test_cut['from_split']} split, seeded test cut)"
    if params.decontaminate:
        items, data.dropped = decontaminate(items)
        data.decontaminated = True
    for split in SPLITS:
        chosen = [item for item in items if item.split == split]
        limit = getattr(params.max_items, split)
        data.splits[split] = cap(chosen, limit, split_seed(seed, task_name, f"cap-{split}"))
    return data


def prepare_data(params: DataParams, seed: int) -> dict[str, TaskData]:
    """Every task named in params, loaded and split; fails on the first task that cannot load."""
    return {name: prepare_task(name, params, seed) for name in params.tasks}


# ---- the contamination guard ------------------------------------------------------------------------
# An option label at the start of a line: "A.text", "A. text", "(A) text", "A) text", "A: text" and the
# "A?" typos of the LogiQA file (after case folding, so the letter is lower case).
_OPTION_LABEL = re.compile(r"^\(?([a-z])\s*[.):?]\s*")
_TRAILING_PUNCTUATION = " .,;:!?"
_OPTIONS_HEADER = "options:"
_PASSAGE_AND_CLAIM = re.compile(r"passage:\s*(.*?)\n\s*claim:\s*([^\n]*)", re.IGNORECASE | re.DOTALL)


def normalise_text(text: str) -> str:
    """The form in which the contamination guard compares two texts. Deterministic and plain:

    1. Unicode NFKC (compatibility forms such as full-width letters become the plain ones), then
       case folding;
    2. per line: runs of white space become one space; an option label at the start ("A.text",
       "A. text", "(A) text", "A) text", "A: text") is written ``a. text``; trailing spaces and
       punctuation (``. , ; : ! ?``) are dropped;
    3. empty lines are dropped and the rest joined with one space.

    So "A.text" and "a. Text " compare equal, and so do texts that differ only in line breaks,
    white space, letter case or a final full stop; any other difference (a word, a digit, a LaTeX
    command) keeps them apart.
    """
    lines = []
    for line in unicodedata.normalize("NFKC", text).casefold().splitlines():
        line = _OPTION_LABEL.sub(r"\1. ", " ".join(line.split())).rstrip(_TRAILING_PUNCTUATION)
        if line:
            lines.append(line)
    return " ".join(lines)


def without_options_block(question: str) -> str:
    """The question without a final ``Options:`` block of option lines (as BIG-bench rows end)."""
    lines = question.splitlines()
    headers = [index for index, line in enumerate(lines) if line.strip().casefold() == _OPTIONS_HEADER]
    if not headers:
        return question
    start = headers[-1]
    after = [line.strip().casefold() for line in lines[start + 1 :] if line.strip()]
    if not all(_OPTION_LABEL.match(line) for line in after):
        return question  # not an option list: keep the text as it is
    return "\n".join(lines[:start])


def _question_keys(item: Item) -> set[str]:
    text = normalise_text(item.question)
    return {f"question:{text}"} if text else set()


def _bigbench_keys(item: Item) -> set[str]:
    # The same passage and claim is the same question whatever options or instructions surround it.
    keys = set()
    text = normalise_text(without_options_block(item.question))
    if text:
        keys.add(f"question:{text}")
    match = _PASSAGE_AND_CLAIM.search(item.question)
    if match and match.group(1).strip() and match.group(2).strip():
        keys.add(f"passage+claim:{normalise_text(match.group(1))} || {normalise_text(match.group(2))}")
    return keys


def _mbpp_keys(item: Item) -> set[str]:
    # task_id names an MBPP problem in every copy (the "sanitized" configuration rewords the text)
    keys = _question_keys(item)
    if item.source_id is not None and item.source_id.strip():
        keys.add(f"task_id:{item.source_id.strip()}")
    return keys


CONTENT_KEYS: dict[str, Callable[[Item], set[str]]] = {"bigbench": _bigbench_keys, "mbpp": _mbpp_keys}


def content_keys(item: Item) -> set[str]:
    """The keys on which two items of a task count as the same question; one shared key is a match.

    Every task: the normalised question (:func:`normalise_text`). BIG-bench: the question without
    its ``Options:`` block, and the passage and claim where the question has ``Passage:`` and
    ``Claim:`` lines. MBPP: also the ``task_id`` (the item's ``source_id``).
    """
    return CONTENT_KEYS.get(item.task, _question_keys)(item)


def decontaminate(items: list[Item]) -> tuple[list[Item], dict[str, dict[str, str]]]:
    """Drop every train or validation item that shares a content key with a test item.

    Returns the kept items (in their order) and, per split, ``{dropped item id: test item id}``; a
    dropped item matching several test items names the one with the smallest key. One pass over a
    dict of the test items' keys, so it is linear in the number of items.
    """
    test_ids: dict[str, str] = {}
    for item in items:
        if item.split == "test":
            for key in content_keys(item):
                test_ids.setdefault(key, item.id)
    kept, dropped = [], {"train": {}, "validation": {}}
    for item in items:
        if item.split != "test":
            match = next((test_ids[key] for key in sorted(content_keys(item)) if key in test_ids), None)
            if match is not None:
                dropped.setdefault(item.split, {})[item.id] = match
                continue
        kept.append(item)
    return kept, dropped


def decontamination_table(data: Mapping[str, TaskData]) -> list[dict[str, Any]]:
    """One row per task: whether the guard ran and how many train and validation items it dropped."""
    return [
        {
            "task": name,
            "guard": "on" if task_data.decontaminated else "off",
            **{f"dropped_{split}": len(task_data.dropped.get(split, {})) for split in ("train", "validation")},
        }
        for name, task_data in data.items()
    ]


# ---- the evaluated split ----------------------------------------------------------------------------
def check_eval_splits(data: Mapping[str, TaskData] | Mapping[str, Mapping[str, int]], params: Params) -> list[str]:
    """The tasks of ``data.tasks`` that evaluation leaves out, or a :class:`DataError`.

    ``data`` is what :func:`prepare_data` returns or the ``counts`` of ``summary.json``. A task
    with no items in ``eval.split`` is an error unless ``data.allow_empty_eval`` names it; the
    tasks it names that have none are returned, so every table can say they were left out.
    Stage 01 calls it before writing anything, and stage 05 before any model loads.
    """
    split = params.eval.split
    counts = {name: value.counts() if isinstance(value, TaskData) else dict(value) for name, value in data.items()}
    empty = [name for name in params.data.tasks if not counts.get(name, {}).get(split, 0)]
    refused = [name for name in empty if name not in params.data.allow_empty_eval]
    if refused:
        raise DataError(
            f"task(s) {', '.join(refused)} have no items in the {split!r} split, the split stage 05 evaluates "
            f"(eval.split: {split}). Give them {split} items (data.test_source: official with data.official_dir, "
            f"a larger data.split_fractions.{split} or data.max_items.{split}), evaluate another split (eval.split), "
            f"remove them from data.tasks, or list them in data.allow_empty_eval to evaluate without them "
            "(the exclusion is recorded and stated)"
        )
    if empty and len(empty) == len(params.data.tasks):
        raise DataError(f"no task has items in the {split!r} split (eval.split): there is nothing to evaluate")
    return empty


def eval_exclusions(data_dir: str | Path, params: Params) -> list[str]:
    """The tasks stage 05 leaves out (see :func:`check_eval_splits`), from stage 01's ``summary.json``."""
    path = Path(data_dir) / "summary.json"
    if not path.is_file():
        raise DataFileNotFound(f"{path} not found: run stage 01_data for this run first")
    summary = json.loads(path.read_text(encoding="utf-8"))
    return check_eval_splits(summary["counts"], params)


def counts_table(data: dict[str, TaskData]) -> list[dict[str, Any]]:
    """One row per task: items per split and the source of each split."""
    return [
        {
            "task": name,
            **task_data.counts(),
            "source": task_data.sources["train"],
            "test_source": task_data.sources["test"],
        }
        for name, task_data in data.items()
    ]


def length_rows(data: dict[str, TaskData]) -> list[dict[str, Any]]:
    """One row per item with the question length in characters and words (for the length plot)."""
    return [
        {"task": name, "split": split, "id": item.id, "chars": len(item.question), "words": len(item.question.split())}
        for name, task_data in data.items()
        for split, items in task_data.splits.items()
        for item in items
    ]


def data_summary(data: Mapping[str, TaskData], *, matches: bool = True) -> dict[str, Any]:
    """What ``summary.json`` and stage 01's manifest entry record (the manifest without ``matches``,
    the ids of every dropped item and of the test item it matched)."""
    decontamination: dict[str, Any] = {
        "enabled": all(task_data.decontaminated for task_data in data.values()),  # data.decontaminate
        "dropped": {
            name: {split: len(task_data.dropped.get(split, {})) for split in ("train", "validation")}
            for name, task_data in data.items()
        },
    }
    if matches:
        decontamination["matches"] = {name: task_data.dropped for name, task_data in data.items()}
    counts = {name: task_data.counts() for name, task_data in data.items()}
    return {
        "counts": counts,
        "sources": {name: task_data.sources for name, task_data in data.items()},
        "input_sha256": {name: task_data.input_hashes for name, task_data in data.items()},
        "decontamination": decontamination,
        "test_cuts": {name: task_data.test_cut for name, task_data in data.items() if task_data.test_cut is not None},
        "allow_empty_eval": [name for name, task_data in data.items() if task_data.allow_empty_eval],
        # per split eval.split may name: the allowed tasks without items there, which evaluation leaves out
        "eval_exclusions": {
            split: [name for name, task_data in data.items() if task_data.allow_empty_eval and not counts[name][split]]
            for split in ("validation", "test")
        },
    }


def write_data(data: dict[str, TaskData], out_dir: str | Path) -> list[Path]:
    """Write the items as JSONL per task and split, as a ``datasets.DatasetDict``, and a summary."""
    out_dir = Path(out_dir)
    written = []
    for name, task_data in data.items():
        for split, items in task_data.splits.items():
            written.append(write_items(items, out_dir / name / f"{split}.jsonl"))
    written.append(write_dataset(data, out_dir / "dataset"))
    written.append(atomic_write_json(out_dir / "summary.json", data_summary(data)))
    return written


def write_dataset(data: dict[str, TaskData], path: Path) -> Path:
    from datasets import Dataset, DatasetDict, Features, Sequence, Value
    from datasets.utils import (
        disable_progress_bars,
        enable_progress_bars,
        is_progress_bar_enabled,
    )

    features = Features(
        {
            "task": Value("string"),
            "id": Value("string"),
            "question": Value("string"),
            "gold": Value("string"),
            "options": Sequence(Value("string")),
            "tests": Sequence(Value("string")),
            "setup_code": Value("string"),
            "split": Value("string"),
            "source_id": Value("string"),
            "metadata": Value("string"),
        }
    )
    splits = {}
    for split in SPLITS:
        rows = [
            {**item.to_dict(), "metadata": json.dumps(item.metadata, sort_keys=True, ensure_ascii=False)}
            for task_data in data.values()
            for item in task_data.splits[split]
        ]
        dataset = (
            Dataset.from_list(rows, features=features)
            if rows
            else Dataset.from_dict({column: [] for column in DATASET_COLUMNS}, features=features)
        )
        # datasets gives in-memory tables a random fingerprint; derive it from the content instead,
        # so writing the same items twice gives byte-identical files.
        content = json.dumps(rows, sort_keys=True, ensure_ascii=False).encode("utf-8")
        dataset._fingerprint = hashlib.sha256(content).hexdigest()[:16]
        splits[split] = dataset
    bars = is_progress_bar_enabled()
    disable_progress_bars()
    try:
        with atomic_directory(path) as tmp:
            DatasetDict(splits).save_to_disk(str(tmp))
    finally:
        if bars:
            enable_progress_bars()
    return path


def load_run_items(data_dir: str | Path, task: str, split: str) -> list[Item]:
    """Read back the items stage 01 wrote (what later stages use)."""
    path = Path(data_dir) / task / f"{split}.jsonl"
    if not path.is_file():
        raise DataFileNotFound(f"{path} not found: run stage 01_data for this run first")
    items, lines = [], []
    for line, row in read_jsonl(path):
        item = Item.from_dict(row, where=f"{path}:{line}")
        # the file's place says which task and split it holds; an item that disagrees was edited or moved
        if item.task != task or item.split != split:
            raise DataError(
                f"{path}:{line}: item {item.id!r} is task {item.task!r}, split {item.split!r}; "
                f"this file holds task {task!r}, split {split!r}"
            )
        items.append(item)
        lines.append(line)
    return check_unique_ids(items, source=str(path), lines=lines)
