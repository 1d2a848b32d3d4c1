"""Loading items: official JSONL, built-in samples, the unified schema, hub rows; and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reflectevo.core.jsonl import read_jsonl, write_jsonl_atomic
from reflectevo.errors import DataError, DataFileNotFound, ReflectEvoError
from reflectevo.tasks import SPLITS, TASKS, Item, get_task
from reflectevo.tasks.base import write_items


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- official files ----------------------------------------------------------------------------


def test_official_ids_follow_the_official_loader(official_items):
    logiqa, bigbench, math, mbpp = (official_items[name] for name in ("logiqa", "bigbench", "math", "mbpp"))
    for items in (logiqa, bigbench, math):
        assert [item.id for item in items] == [str(i) for i in range(1, 501)]  # row index + 1
    assert logiqa[0].source_id == "276"  # the file's own id is kept
    assert {item.id for item in mbpp} == {str(task_id) for task_id in range(11, 511)}  # task_id
    assert all(item.source_id is None for item in bigbench if item.metadata["answer_type"] == "free")


def test_official_contents(official_items):
    bigbench = official_items["bigbench"]
    assert sum(item.metadata["answer_type"] == "choice" for item in bigbench) == 356
    assert sum(item.metadata["answer_type"] == "free" for item in bigbench) == 144
    # 17 rows list their options as A, C, B, D (parsed); 4 rows have a malformed option block
    assert sum(len(item.options) == 4 for item in official_items["logiqa"]) == 496
    math = official_items["math"]
    assert {item.metadata["level"] for item in math} == {f"Level {n}" for n in range(1, 6)}
    assert len({item.metadata["subject"] for item in math}) == 7
    mbpp = {item.id: item for item in official_items["mbpp"]}
    assert [i for i, item in mbpp.items() if item.setup_code] == ["367"]
    assert mbpp["11"].question.startswith("You are an expert Python programmer, and here is your task: Write a python")
    assert "Your code should pass these tests: ['assert remove_Occ" in mbpp["11"].question


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write_lines(
        tmp_path / "logiqa.jsonl", ['{"question": "q\\nA.a\\nB.b\\nC.c\\nD.d", "answer": "a"}', "{not json"]
    )
    with pytest.raises(DataError, match=r"logiqa\.jsonl:2: not valid JSON"):
        get_task("logiqa").load_official(path)


def test_non_object_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "rows.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"rows\.jsonl:1: expected a JSON object, got list"):
        list(read_jsonl(path))


def test_missing_field_names_file_and_line(tmp_path):
    path = write_lines(
        tmp_path / "math.jsonl", ['{"problem": "1+1", "solution": "\\\\boxed{2}"}', '{"problem": "2+2"}']
    )
    with pytest.raises(DataError, match=r"math\.jsonl:2: missing field 'solution'"):
        get_task("math").load_official(path)


def test_math_row_without_boxed_answer_is_an_error(tmp_path):
    path = write_lines(tmp_path / "math.jsonl", ['{"problem": "1+1", "solution": "it is two"}'])
    with pytest.raises(DataError, match=r"math\.jsonl:1: the solution has no final \\boxed"):
        get_task("math").load_official(path)


def test_wrong_type_and_bad_gold_are_errors(tmp_path):
    path = write_lines(tmp_path / "logiqa.jsonl", ['{"question": "q", "answer": 3}'])
    with pytest.raises(DataError, match=r"logiqa\.jsonl:1: field 'answer' must be str"):
        get_task("logiqa").load_official(path)
    path = write_lines(tmp_path / "logiqa2.jsonl", ['{"question": "q", "answer": "e"}'])
    with pytest.raises(DataError, match="one letter a-d"):
        get_task("logiqa").load_official(path)


def test_duplicate_mbpp_task_ids_are_an_error(tmp_path):
    row = {"text": "t", "code": "def f(): pass", "task_id": 7, "test_list": ["assert True"], "test_setup_code": ""}
    path = write_lines(tmp_path / "mbpp.jsonl", [json.dumps(row), json.dumps(row)])
    with pytest.raises(DataError, match=r"item id '7' appears twice \(rows 1 and 2\)"):
        get_task("mbpp").load_official(path)


def test_missing_file_says_which_path(tmp_path):
    missing = tmp_path / "nowhere" / "logiqa_test.jsonl"
    with pytest.raises(DataFileNotFound, match=str(missing)):
        get_task("logiqa").load_official(missing)


def test_bigbench_dict_gold_is_accepted(tmp_path):
    path = write_lines(tmp_path / "bb.jsonl", [json.dumps({"question": "Q?", "answer": {"answer": "Paris"}})])
    assert get_task("bigbench").load_official(path)[0].gold == "Paris"


# ---- built-in samples and the unified schema -------------------------------------------------


def test_samples_have_fixed_roles_and_the_unified_schema():
    for name, task in TASKS.items():
        items = task.load_samples()
        assert len(items) == 20, name
        assert [sum(item.split == split for item in items) for split in SPLITS] == [12, 4, 4]
        assert all(item.task == name and item.id.startswith("s") for item in items)
        assert [item.id for item in task.load_samples("test")] == ["s17", "s18", "s19", "s20"]
    bigbench = get_task("bigbench").load_samples()
    assert {item.metadata["answer_type"] for item in bigbench if item.split == "test"} == {"choice", "free"}


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        get_task("math").load_samples("dev")


def test_unified_items_round_trip(tmp_path):
    items = get_task("bigbench").load_samples()
    path = write_items(items, tmp_path / "items.jsonl")
    assert get_task("bigbench").load_items(path) == items
    assert get_task("bigbench").load_file(path) == items  # detected as unified items
    assert not list(tmp_path.glob(".items.jsonl.*"))  # the temporary file was renamed away


def test_load_file_detects_the_official_schema(official_dir):
    items = get_task("logiqa").load_file(official_dir / "logiqa_test.jsonl")
    assert len(items) == 500 and items[0].id == "1"


def test_unified_schema_errors(tmp_path):
    good = get_task("math").load_samples()[0].to_dict()
    cases = [
        ({**good, "gold": 3}, "field 'gold' must be a string"),
        ({k: v for k, v in good.items() if k != "question"}, "missing required field 'question'"),
        ({**good, "answer": "x"}, r"unknown field\(s\) \['answer'\]"),
        ({**good, "split": "dev"}, "split must be one of"),
        ({**good, "tests": [1]}, "every entry of 'tests' must be a string"),
    ]
    for row, message in cases:
        path = write_lines(tmp_path / "items.jsonl", [json.dumps(row)])
        with pytest.raises(DataError, match=r"items\.jsonl:1: " + message):
            get_task("math").load_items(path)
    path = write_lines(tmp_path / "items.jsonl", [json.dumps(good)])
    with pytest.raises(DataError, match="belongs to task 'math', not 'logiqa'"):
        get_task("logiqa").load_items(path)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    write_jsonl_atomic(target, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(target, rows())
    assert target.read_text() == '{"a": 1}\n'  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_mbpp_cannot_grade_a_bare_answer():
    with pytest.raises(ReflectEvoError, match="--data FILE --id ID"):
        get_task("mbpp").item_from_answer("def f(): pass")


# ---- hub rows --------------------------------------------------------------------------------
# No hub is reachable here, so the mapping functions are tested on rows written in each hub
# dataset's schema, and load_hub runs the real `datasets.load_dataset` on a local folder laid out
# like the hub repository.


def test_logiqa_hub_row():
    row = {"context": "All cats purr.", "query": "Which follows?", "options": ["a", "b", "c", "d"], "correct_option": 2}
    item = get_task("logiqa").from_hub_row(row, 0, split="train")
    assert item.question == "All cats purr.\nWhich follows?\nA.a\nB.b\nC.c\nD.d"
    assert (item.gold, item.options, item.id) == ("c", ["a", "b", "c", "d"], "1")
    assert get_task("logiqa").from_hub_row({**row, "correct_option": "3"}, 4).gold == "d"  # string-typed exports
    with pytest.raises(DataError, match="correct_option must be an index 0-3"):
        get_task("logiqa").from_hub_row({**row, "correct_option": 7}, 0)
    with pytest.raises(DataError, match="expected 4 options"):
        get_task("logiqa").from_hub_row({**row, "options": ["a"]}, 0)


def test_math_hub_row():
    row = {"problem": "Find $x$.", "level": "Level 2", "type": "Algebra", "solution": "So $x = \\boxed{\\frac{1}{2}}$."}
    item = get_task("math").from_hub_row(row, 9)
    assert (item.id, item.gold, item.metadata["subject"], item.metadata["level"]) == (
        "10",
        "\\frac{1}{2}",
        "Algebra",
        "Level 2",
    )
    assert get_task("math").from_hub_row({**row, "solution": "no box"}, 0) is None  # counted and skipped by load_hub


def test_mbpp_hub_rows_full_and_sanitized():
    full = {
        "task_id": 601,
        "text": "Write f.",
        "code": "def f(): return 1",
        "test_list": ["assert f() == 1"],
        "test_setup_code": "",
        "challenge_test_list": [],
    }
    item = get_task("mbpp").from_hub_row(full, 0)
    assert item.id == "601" and item.question.endswith("Your code should pass these tests: ['assert f() == 1']")
    sanitized = {
        "task_id": 602,
        "prompt": "Write g.",
        "code": "import math\ndef g(): return math.pi",
        "test_imports": ["import math"],
        "test_list": ["assert g() == math.pi"],
        "source_file": "x",
    }
    item = get_task("mbpp").from_hub_row(sanitized, 1)
    assert item.id == "602" and item.setup_code == "import math" and item.metadata["text"] == "Write g."


def test_bigbench_hub_rows():
    choice = {
        "inputs": "Passage: p\nClaim: c",
        "targets": ["False"],
        "multiple_choice_targets": ["True", "False", "Neither"],
        "multiple_choice_scores": [0, 1, 0],
        "idx": 12,
    }
    item = get_task("bigbench").from_hub_row(choice, 0, subtask="vitaminc_fact_verification")
    assert item.question.endswith("Claim: c\nOptions:\nA. True\nB. False\nC. Neither")
    assert (item.gold, item.metadata["answer_type"], item.source_id) == ("b", "choice", "vitaminc_fact_verification:12")
    free = {
        "inputs": "Q: capital of France?",
        "targets": ["Paris", "paris"],
        "multiple_choice_targets": [],
        "multiple_choice_scores": [],
        "idx": 3,
    }
    item = get_task("bigbench").from_hub_row(free, 1, subtask="qa")
    assert (item.gold, item.metadata["answer_type"], item.metadata["all_targets"]) == (
        "Paris",
        "free",
        ["Paris", "paris"],
    )
    with pytest.raises(DataError, match="exactly one correct"):
        get_task("bigbench").from_hub_row({**choice, "multiple_choice_scores": [1, 1, 0]}, 0)


def _parquet(rows: list[dict], path: Path) -> None:
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).to_parquet(str(path))


def _configs_readme(folder: Path, configs: dict[str, list[str]]) -> None:
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {name}/{split}-*" for split in splits]
    (folder / "README.md").write_text("\n".join(lines + ["---", ""]), encoding="utf-8")


def test_load_hub_through_datasets_on_local_copies(tmp_path):
    cache = {"cache_dir": str(tmp_path / "cache")}
    logiqa = tmp_path / "logiqa"
    _parquet(
        [{"context": "c", "query": "q", "options": ["w", "x", "y", "z"], "correct_option": 1}] * 2,
        logiqa / "data" / "test-00000-of-00001.parquet",
    )
    items = get_task("logiqa").load_hub("test", path=str(logiqa), **cache)
    assert [(item.id, item.gold) for item in items] == [("1", "b"), ("2", "b")]

    math = tmp_path / "math"
    for subject in ("algebra", "geometry"):
        _parquet(
            [
                {"problem": f"{subject}?", "level": "Level 1", "type": subject, "solution": "\\boxed{1}"},
                {"problem": "bad", "level": "Level 1", "type": subject, "solution": "none"},
            ],
            math / subject / "test-00000-of-00001.parquet",
        )
    _configs_readme(math, {"algebra": ["test"], "geometry": ["test"]})
    with pytest.warns(UserWarning, match="skipped 2 rows"):
        items = get_task("math").load_hub("test", subjects=("algebra", "geometry"), path=str(math), **cache)
    assert [(item.id, item.question) for item in items] == [("1", "algebra?"), ("3", "geometry?")]
    with pytest.raises(ValueError, match="unknown MATH subject"):
        get_task("math").load_hub("test", subjects=("calculus",), path=str(math))

    mbpp = tmp_path / "mbpp"
    _parquet(
        [
            {
                "task_id": 11,
                "text": "t",
                "code": "def f(): return 1",
                "test_list": ["assert f() == 1"],
                "test_setup_code": "",
                "challenge_test_list": [],
            }
        ],
        mbpp / "full" / "test-00000-of-00001.parquet",
    )
    _configs_readme(mbpp, {"full": ["test"]})
    assert get_task("mbpp").load_hub("test", path=str(mbpp), **cache)[0].id == "11"

    bigbench = tmp_path / "bigbench"
    _parquet(
        [
            {
                "inputs": "Claim?",
                "targets": ["True"],
                "multiple_choice_targets": ["True", "False"],
                "multiple_choice_scores": [1, 0],
                "idx": 0,
            }
        ],
        bigbench / "vitaminc" / "validation-00000-of-00001.parquet",
    )
    _configs_readme(bigbench, {"vitaminc": ["validation"]})
    item = get_task("bigbench").load_hub("validation", subtasks=("vitaminc",), path=str(bigbench), **cache)[0]
    assert (item.gold, item.options) == ("a", ["True", "False"])


def test_item_is_a_plain_dataclass():
    item = Item(task="math", id="1", question="q", gold="1")
    assert item.to_dict()["options"] == [] and Item.from_dict(item.to_dict(), where="x") == item
