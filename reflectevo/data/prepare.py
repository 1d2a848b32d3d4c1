"""Stage 01: load the tasks named in params, give every item a split, write them into the run.

Where items come from (``data.source``, and ``data.test_source`` for the test split alone):

* ``samples``: the built-in items, which keep their fixed train / validation / test roles;
* ``official``: the paper's 500-item test files in ``data.official_dir``, checked against their
  sha256 at the paper's commit; they carry no split, so a seeded shuffle cuts them by
  ``data.split_fractions`` (or all of them are the test split when they are the ``test_source``);
* ``hub``: the hub datasets, split by split as the hub provides them (``Task.hub_splits``).

Paper replication is ``source: hub, test_source: official``: reflections on hub training data, the
evaluation on the full official files, so N = 500 per task as in the paper.

Written under ``outputs/<run>/data/``: ``<task>/<split>.jsonl`` (the unified item schema),
``dataset/`` (the same items as a ``datasets.DatasetDict``, metadata as a JSON string column) and
``summary.json`` (counts, sources, file hashes).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflectevo.config import DataParams, derive_seed
from reflectevo.errors import DataError, DataFileNotFound
from reflectevo.jsonl import read_jsonl
from reflectevo.runs import atomic_directory, atomic_write_json, file_sha256
from reflectevo.tasks import SPLITS, Item, get_task
from reflectevo.tasks.base import check_unique_ids, write_items

DATASET_COLUMNS = ("task", "id", "question", "gold", "options", "tests", "setup_code", "split", "source_id", "metadata")


@dataclass
class TaskData:
    """The items of one task, by split, and where they came from."""

    task: str
    splits: dict[str, list[Item]] = field(default_factory=lambda: {split: [] for split in SPLITS})
    sources: dict[str, str] = field(default_factory=dict)  # split -> "samples" | "official:<file>" | "hub:<id>"
    input_hashes: dict[str, str] = field(default_factory=dict)  # file -> sha256

    def counts(self) -> dict[str, int]:
        return {split: len(items) for split, items in self.splits.items()}


def split_seed(seed: int, task: str, purpose: str) -> int:
    """A seed per (run seed, task, purpose), so adding a task never reshuffles another one."""
    return derive_seed(seed, task, purpose)


def load_official_checked(task_name: str, official_dir: str | Path, check_sha256: bool = True) -> tuple[list[Item], str]:
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
        return [_with_split(item, None) for item in items], f"official:{task.official_file}", {task.official_file: digest}
    if source == "hub":
        options = dict(params.hub_options.get(task_name, {}))
        items = []
        for split in task.hub_splits:
            for item in task.load_hub(split=split, **options):
                # hub ids count rows per split; prefix the split so ids stay unique within the task
                items.append(Item(**{**item.to_dict(), "id": f"{split}-{item.id}", "split": split,
                                     "source_id": item.source_id or item.id}))
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


def prepare_task(task_name: str, params: DataParams, seed: int) -> TaskData:
    data = TaskData(task_name)
    items, described, hashes = load_source(task_name, params.source, params)
    data.input_hashes.update(hashes)
    items = assign_splits(items, params.split_fractions.model_dump(), split_seed(seed, task_name, "split"))
    test_source = params.test_source
    if test_source is not None and test_source != params.source:
        items = [item for item in items if item.split != "test"]
        test_items, test_described, test_hashes = load_source(task_name, test_source, params)
        data.input_hashes.update(test_hashes)
        if test_source == "official":
            test_items = [_with_split(item, "test") for item in test_items]  # the whole file is the test set
        else:
            test_items = [item for item in test_items if item.split == "test"]
        clash = {item.id for item in items} & {item.id for item in test_items}
        if clash:
            raise DataError(f"{task_name}: test items from {test_source} reuse ids of {params.source} items: {sorted(clash)[:5]}")
        items = items + test_items
        data.sources["test"] = test_described
    for split in SPLITS:
        data.sources.setdefault(split, described)
    for split in SPLITS:
        chosen = [item for item in items if item.split == split]
        limit = getattr(params.max_items, split)
        data.splits[split] = cap(chosen, limit, split_seed(seed, task_name, f"cap-{split}"))
    return data


def prepare_data(params: DataParams, seed: int) -> dict[str, TaskData]:
    """Every task named in params, loaded and split; fails on the first task that cannot load."""
    return {name: prepare_task(name, params, seed) for name in params.tasks}


def counts_table(data: dict[str, TaskData]) -> list[dict[str, Any]]:
    """One row per task: items per split and the source of each split."""
    return [{"task": name, **task_data.counts(), "source": task_data.sources["train"],
             "test_source": task_data.sources["test"]} for name, task_data in data.items()]


def length_rows(data: dict[str, TaskData]) -> list[dict[str, Any]]:
    """One row per item with the question length in characters and words (for the length plot)."""
    return [{"task": name, "split": split, "id": item.id, "chars": len(item.question), "words": len(item.question.split())}
            for name, task_data in data.items() for split, items in task_data.splits.items() for item in items]


def write_data(data: dict[str, TaskData], out_dir: str | Path) -> list[Path]:
    """Write the items as JSONL per task and split, as a ``datasets.DatasetDict``, and a summary."""
    out_dir = Path(out_dir)
    written = []
    for name, task_data in data.items():
        for split, items in task_data.splits.items():
            written.append(write_items(items, out_dir / name / f"{split}.jsonl"))
    written.append(write_dataset(data, out_dir / "dataset"))
    summary = {
        "counts": {name: task_data.counts() for name, task_data in data.items()},
        "sources": {name: task_data.sources for name, task_data in data.items()},
        "input_sha256": {name: task_data.input_hashes for name, task_data in data.items()},
    }
    written.append(atomic_write_json(out_dir / "summary.json", summary))
    return written


def write_dataset(data: dict[str, TaskData], path: Path) -> Path:
    from datasets import Dataset, DatasetDict, Features, Sequence, Value
    from datasets.utils import (
        disable_progress_bars,
        enable_progress_bars,
        is_progress_bar_enabled,
    )

    features = Features({
        "task": Value("string"), "id": Value("string"), "question": Value("string"), "gold": Value("string"),
        "options": Sequence(Value("string")), "tests": Sequence(Value("string")), "setup_code": Value("string"),
        "split": Value("string"), "source_id": Value("string"), "metadata": Value("string"),
    })
    splits = {}
    for split in SPLITS:
        rows = [{**item.to_dict(), "metadata": json.dumps(item.metadata, sort_keys=True, ensure_ascii=False)}
                for task_data in data.values() for item in task_data.splits[split]]
        dataset = Dataset.from_list(rows, features=features) if rows else Dataset.from_dict(
            {column: [] for column in DATASET_COLUMNS}, features=features)
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
            raise DataError(f"{path}:{line}: item {item.id!r} is task {item.task!r}, split {item.split!r}; "
                            f"this file holds task {task!r}, split {split!r}")
        items.append(item)
        lines.append(line)
    return check_unique_ids(items, source=str(path), lines=lines)
