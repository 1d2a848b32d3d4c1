"""Stage 01's data preparation: sources, seeded splits, caps, sha256 checks and the written files."""

from __future__ import annotations

import json
import shutil

import pytest

from reflectevo.config import load_params
from reflectevo.data.prepare import load_run_items, prepare_data, write_data
from reflectevo.errors import DataError, DataFileNotFound


def data_params(**data):
    return load_params(None, {"data": data}).data


def test_samples_keep_their_fixed_roles():
    prepared = prepare_data(data_params(), seed=0)
    for name, task_data in prepared.items():
        assert task_data.counts() == {"train": 12, "validation": 4, "test": 4}, name
        assert [item.id for item in task_data.splits["test"]] == ["s17", "s18", "s19", "s20"]


def test_caps_are_seeded_and_kept_in_source_order():
    first = prepare_data(data_params(tasks=["logiqa"], max_items={"train": 3}), seed=1)["logiqa"].splits["train"]
    again = prepare_data(data_params(tasks=["logiqa"], max_items={"train": 3}), seed=1)["logiqa"].splits["train"]
    other = prepare_data(data_params(tasks=["logiqa"], max_items={"train": 3}), seed=2)["logiqa"].splits["train"]
    ids = [item.id for item in first]
    assert ids == [item.id for item in again] and ids == sorted(ids) and len(ids) == 3
    assert ids != [item.id for item in other]


def test_official_files_are_split_by_seeded_fractions(official_dir):
    params = data_params(tasks=["math", "logiqa"], source="official", official_dir=str(official_dir))
    prepared = prepare_data(params, seed=0)
    assert prepared["math"].counts() == {"train": 400, "validation": 50, "test": 50}
    assert (
        prepared["math"].input_hashes["math_test.jsonl"]
        == "291551a7ade17d6a4541c386752f7d7742f11258928878f71fe4e88977add68b"
    )
    again = prepare_data(params, seed=0)
    assert [i.id for i in again["math"].splits["test"]] == [i.id for i in prepared["math"].splits["test"]]
    # adding a task does not reshuffle another one
    alone = prepare_data(data_params(tasks=["math"], source="official", official_dir=str(official_dir)), seed=0)
    assert [i.id for i in alone["math"].splits["test"]] == [i.id for i in prepared["math"].splits["test"]]


def test_replication_layout_tests_on_all_500_official_items(official_dir):
    params = data_params(tasks=["mbpp"], source="samples", test_source="official", official_dir=str(official_dir))
    task_data = prepare_data(params, seed=0)["mbpp"]
    assert task_data.counts() == {"train": 12, "validation": 4, "test": 500}
    assert task_data.sources == {"train": "samples", "validation": "samples", "test": "official:mbpp_test.jsonl"}


def test_a_modified_official_file_is_refused(official_dir, tmp_path):
    shutil.copy(official_dir / "logiqa_test.jsonl", tmp_path / "logiqa_test.jsonl")
    with open(tmp_path / "logiqa_test.jsonl", "a") as handle:
        handle.write('{"id": 99999, "question": "x\\nA.a\\nB.b\\nC.c\\nD.d", "answer": "a"}\n')
    params = data_params(tasks=["logiqa"], source="official", official_dir=str(tmp_path))
    with pytest.raises(DataError, match="not the paper's"):
        prepare_data(params, seed=0)
    unchecked = data_params(tasks=["logiqa"], source="official", official_dir=str(tmp_path), check_sha256=False)
    assert sum(prepare_data(unchecked, seed=0)["logiqa"].counts().values()) == 501


def test_a_missing_official_file_says_where_to_get_it(tmp_path):
    params = data_params(tasks=["bigbench"], source="official", official_dir=str(tmp_path))
    with pytest.raises(DataFileNotFound, match="bigai-nlco/ReflectEvo.*6634f923"):
        prepare_data(params, seed=0)


def test_hub_source_keeps_hub_splits_with_unique_ids(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "logiqa"
    for split, n in (("train", 3), ("validation", 2), ("test", 2)):
        (folder / "data").mkdir(parents=True, exist_ok=True)
        Dataset.from_list(
            [
                {"context": f"c{split}{i}", "query": "q", "options": ["w", "x", "y", "z"], "correct_option": 1}
                for i in range(n)
            ]
        ).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    params = data_params(
        tasks=["logiqa"],
        source="hub",
        hub_options={"logiqa": {"path": str(folder), "cache_dir": str(tmp_path / "cache")}},
    )
    task_data = prepare_data(params, seed=0)["logiqa"]
    assert task_data.counts() == {"train": 3, "validation": 2, "test": 2}
    assert [item.id for item in task_data.splits["train"]] == ["train-1", "train-2", "train-3"]
    assert task_data.splits["test"][0].source_id == "1"


def test_written_files_round_trip(tmp_path):
    prepared = prepare_data(data_params(tasks=["mbpp", "bigbench"]), seed=0)
    written = write_data(prepared, tmp_path / "data")
    assert {path.name for path in written} >= {"train.jsonl", "dataset", "summary.json"}
    items = load_run_items(tmp_path / "data", "mbpp", "validation")
    assert [item.to_dict() for item in items] == [item.to_dict() for item in prepared["mbpp"].splits["validation"]]
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert summary["counts"]["bigbench"] == {"train": 12, "validation": 4, "test": 4}
    from datasets import load_from_disk

    dataset = load_from_disk(str(tmp_path / "data" / "dataset"))
    row = dataset["test"][0]
    assert json.loads(row["metadata"]) == prepared["mbpp"].splits["test"][0].metadata
    with pytest.raises(DataFileNotFound, match="run stage 01_data"):
        load_run_items(tmp_path / "nowhere", "mbpp", "train")


def test_writing_twice_gives_identical_bytes(tmp_path):
    prepared = prepare_data(data_params(tasks=["logiqa"]), seed=0)
    write_data(prepared, tmp_path / "a")
    write_data(prepared, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
