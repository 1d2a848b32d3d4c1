"""Stage 01's contamination guard and its checks on the evaluated split.

The hub copies here are local folders laid out like the hub datasets, read by the real
``datasets.load_dataset``; their rows are taken from the official test files, verbatim or with case
and white-space changes, next to rows that only look alike and must be kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reflectevo.analysis.report import data_note
from reflectevo.config import load_params
from reflectevo.core.jsonl import read_jsonl
from reflectevo.data.prepare import (
    check_eval_splits,
    content_keys,
    data_summary,
    decontaminate,
    eval_exclusions,
    normalise_text,
    prepare_data,
    without_options_block,
    write_data,
)
from reflectevo.errors import ConfigError, DataError
from reflectevo.tasks import Item

REPO = Path(__file__).resolve().parents[1]
VITAMINC = "vitaminc_fact_verification"


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


def _official_rows(official_dir: Path, task: str) -> list[dict]:
    return [row for _line, row in read_jsonl(official_dir / f"{task}_test.jsonl")]


def _shout(text: str) -> str:
    """Upper case, doubled spaces, a line break turned into a blank line and trailing spaces: what the
    guard must see through."""
    return text.upper().replace(" ", "  ").replace("\n", " \n\n", 1) + "  "


# ---- the normal form ---------------------------------------------------------------------------------
def test_normal_form_ignores_case_white_space_option_labels_and_final_punctuation():
    written = "Which follows?\nA.The cat sat.\nB.It rained"
    assert (
        normalise_text(written)
        == normalise_text("  which   FOLLOWS \n\nA. the cat sat\n(b) it rained.  ")
        == normalise_text("Which follows\r\nA) The cat sat\nB: It rained!")
    )
    assert normalise_text("ＡＢＣ ｘ") == normalise_text("abc x")  # full-width letters (NFKC)
    # a word, a digit or a LaTeX command still tells two questions apart
    assert normalise_text("What is $2+3$?") != normalise_text("What is $2+4$?")
    assert normalise_text("Find \\frac{1}{2}") != normalise_text("Find \\dfrac{1}{2}")
    assert normalise_text("The cat sat") != normalise_text("The cats sat")
    assert normalise_text(" \n .\n") == ""


def test_bigbench_keys_leave_out_the_options_block_and_pair_passage_with_claim():
    question = "Say True, False or Neither.\n\nPassage: P one.\nClaim: C one .\nOptions:\nA. True\nB. False\nC. Neither"
    assert without_options_block(question) == "Say True, False or Neither.\n\nPassage: P one.\nClaim: C one ."
    item = Item(task="bigbench", id="1", question=question, gold="a")
    other_wording = Item(
        task="bigbench",
        id="2",
        gold="a",
        question="passage:  p one\nclaim: c one\nTrue, False, or Neither?\nOptions:\nA.True\nB.False",
    )
    assert content_keys(item) & content_keys(other_wording)  # the same passage and claim
    other_claim = Item(task="bigbench", id="3", gold="a", question=question.replace("C one", "C two"))
    assert not content_keys(item) & content_keys(other_claim)
    # "Options:" followed by prose is part of the question, not an options block
    assert without_options_block("Options:\nnone of these") == "Options:\nnone of these"


def test_mbpp_matches_on_task_id_too_and_only_within_its_own_fields():
    one = Item(task="mbpp", id="11", question="Write f.", gold="x", source_id="11")
    reworded = Item(task="mbpp", id="train-11", question="Write a function f.", gold="x", source_id="11")
    unnumbered = Item(task="mbpp", id="s01", question="Write g.", gold="x")
    assert content_keys(one) & content_keys(reworded)
    assert content_keys(unnumbered) == {"question:write g"}
    # other tasks never match on source_id: a LogiQA file id is not a question
    assert content_keys(Item(task="logiqa", id="1", question="q", gold="a", source_id="11")) == {"question:q"}


def test_decontaminate_is_one_pass_over_a_dict():
    items = [Item(task="math", id=f"t{i}", question=f"Problem {i}", gold="1", split="test") for i in range(20_000)]
    items += [
        Item(task="math", id=f"r{i}", question=f"problem  {i}.", gold="1", split="train") for i in range(0, 40_000, 2)
    ]
    kept, dropped = decontaminate(items)
    assert len(dropped["train"]) == 10_000 and dropped["train"]["r2"] == "t2" and "r20000" not in dropped["train"]
    assert len(kept) == 20_000 + 10_000


# ---- the replication layout: hub training splits, official test files ---------------------------------
def _logiqa_hub_row(question: str, answer: str) -> dict:
    lines = question.split("\n")
    assert [line[:2] for line in lines[-4:]] == ["A.", "B.", "C.", "D."]
    return {
        "context": "\n".join(lines[:-5]),
        "query": lines[-5],
        "options": [line[2:] for line in lines[-4:]],
        "correct_option": "abcd".index(answer),
    }


def _fresh_logiqa(n: int) -> dict:
    return {
        "context": f"A passage written for this test, number {n}.",
        "query": "Which follows?",
        "options": ["w", "x", "y", "z"],
        "correct_option": 0,
    }


def _vitaminc_row(question: str, answer: str, idx: int) -> dict:
    inputs = question.split("\nOptions:\n")[0]
    return {
        "inputs": inputs,
        "targets": [["True", "False", "Neither"]["abc".index(answer)]],
        "multiple_choice_targets": ["True", "False", "Neither"],
        "multiple_choice_scores": [int(letter == answer) for letter in "abc"],
        "idx": idx,
    }


def build_hub_copies(official_dir: Path, root: Path) -> tuple[dict, dict]:
    """Local hub copies of the four tasks, with official test rows planted in their train and validation
    splits. Returns the hub options and, per task and split, ``{hub item id: official item id}`` of the
    rows the guard must drop."""
    cache = str(root / "cache")
    expected: dict[str, dict[str, dict[str, str]]] = {}

    # LogiQA: two official rows in train (verbatim, shouted), one in validation; the hub's own test split
    # is replaced by the official file, so a planted row there is no contamination.
    rows = _official_rows(official_dir, "logiqa")
    labels = ["A.", "B.", "C.", "D."]
    usable = [
        i
        for i, row in enumerate(rows)
        if [line[:2] for line in row["question"].split("\n")[-4:]] == labels and row["question"].count("\n") >= 5
    ][:4]
    a, b, c, d = (_logiqa_hub_row(rows[i]["question"], rows[i]["answer"]) for i in usable)
    shouted = {
        **b,
        "context": _shout(b["context"]),
        "query": b["query"].lower() + " ",
        "options": [option.upper() + " ." for option in b["options"]],
    }
    logiqa = root / "logiqa"
    for split, split_rows in (
        ("train", [a, _fresh_logiqa(1), shouted]),
        ("validation", [_fresh_logiqa(2), c]),
        ("test", [d, _fresh_logiqa(3)]),
    ):
        _parquet(split_rows, logiqa / "data" / f"{split}-00000-of-00001.parquet")
    expected["logiqa"] = {
        "train": {"train-1": str(usable[0] + 1), "train-3": str(usable[1] + 1)},
        "validation": {"validation-2": str(usable[2] + 1)},
    }

    # MATH: an official problem verbatim and one shouted; one with a digit changed stays.
    rows = _official_rows(official_dir, "math")
    near_miss = next(i for i, row in enumerate(rows) if any(ch.isdigit() for ch in row["problem"]) and i > 2)
    changed = rows[near_miss]["problem"]
    digit = next(ch for ch in changed if ch.isdigit())
    changed = changed.replace(digit, str((int(digit) + 1) % 10), 1)
    math = root / "math"
    _parquet(
        [
            rows[0],
            {**rows[1], "problem": _shout(rows[1]["problem"])},
            {**rows[near_miss], "problem": changed},
            {"problem": "What is $1+1$?", "level": "Level 1", "type": "Algebra", "solution": "$\\boxed{2}$"},
        ],
        math / "algebra" / "train-00000-of-00001.parquet",
    )
    _parquet([rows[2]], math / "algebra" / "test-00000-of-00001.parquet")
    _configs_readme(math, {"algebra": ["train", "test"]})
    expected["math"] = {"train": {"train-1": "1", "train-2": "2"}, "validation": {}}

    # MBPP: verbatim (both keys), the same text and tests under a new task_id and shouted (text key),
    # another text under an official task_id (task_id key), and a problem of its own.
    rows = _official_rows(official_dir, "mbpp")
    fresh = {
        "task_id": 9002,
        "text": "Write a function to add one.",
        "code": "def f(x): return x + 1",
        "test_list": ["assert f(1) == 2"],
        "test_setup_code": "",
        "challenge_test_list": [],
    }
    mbpp = root / "mbpp"
    # (the text is glued to "Your code should pass..." without a space: shouting adds none at its end)
    _parquet(
        [
            rows[0],
            {**rows[1], "task_id": 9001, "text": rows[1]["text"].upper().replace(" ", "  ")},
            {**fresh, "task_id": rows[2]["task_id"], "text": "Reworded for the sanitized copy."},
            fresh,
        ],
        mbpp / "full" / "train-00000-of-00001.parquet",
    )
    _parquet(
        [{**fresh, "task_id": 9003, "text": "Write a function to add two."}, rows[3]],
        mbpp / "full" / "validation-00000-of-00001.parquet",
    )
    _parquet([rows[4]], mbpp / "full" / "test-00000-of-00001.parquet")
    _configs_readme(mbpp, {"full": ["train", "validation", "test"]})
    expected["mbpp"] = {
        "train": {
            "train-11": str(rows[0]["task_id"]),
            "train-9001": str(rows[1]["task_id"]),
            f"train-{rows[2]['task_id']}": str(rows[2]["task_id"]),
        },
        "validation": {f"validation-{rows[3]['task_id']}": str(rows[3]["task_id"])},
    }
    assert rows[0]["task_id"] == 11

    # BIG-bench: VitaminC rows verbatim, shouted, and with the instruction dropped and the hub's
    # "True, False, or Neither?" after the claim; a free-text official row; the same passage with another
    # claim (VitaminC's contrastive pairs) and a fresh row stay.
    rows = _official_rows(official_dir, "bigbench")
    vitaminc = [i for i, row in enumerate(rows) if "\nClaim:" in row["question"]]
    free = next(i for i, row in enumerate(rows) if "Options:" not in row["question"])
    verbatim = _vitaminc_row(rows[vitaminc[0]]["question"], rows[vitaminc[0]]["answer"], 0)
    shouted = _vitaminc_row(rows[vitaminc[1]]["question"], rows[vitaminc[1]]["answer"], 1)
    shouted["inputs"] = _shout(shouted["inputs"])
    reworded = _vitaminc_row(rows[vitaminc[2]]["question"], rows[vitaminc[2]]["answer"], 2)
    reworded["inputs"] = reworded["inputs"][reworded["inputs"].index("Passage:") :] + "\nTrue, False, or Neither?"
    other_claim = _vitaminc_row(rows[vitaminc[3]]["question"], rows[vitaminc[3]]["answer"], 3)
    other_claim["inputs"] = other_claim["inputs"].split("\nClaim:")[0] + "\nClaim: A claim written for this test ."
    free_row = {
        "inputs": rows[free]["question"],
        "targets": [rows[free]["answer"]],
        "multiple_choice_targets": [],
        "multiple_choice_scores": [],
        "idx": 4,
    }
    fresh = _vitaminc_row("Passage: Written for this test.\nClaim: It was written.\nOptions:\nA. True", "a", 5)
    bigbench = root / "bigbench"
    _parquet([verbatim, other_claim, shouted, free_row, reworded], bigbench / VITAMINC / "train-00000-of-00001.parquet")
    _parquet(
        [fresh, _vitaminc_row(rows[vitaminc[4]]["question"], rows[vitaminc[4]]["answer"], 6)],
        bigbench / VITAMINC / "validation-00000-of-00001.parquet",
    )
    _configs_readme(bigbench, {VITAMINC: ["train", "validation"]})
    expected["bigbench"] = {
        "train": {
            "train-1": str(vitaminc[0] + 1),
            "train-3": str(vitaminc[1] + 1),
            "train-4": str(free + 1),
            "train-5": str(vitaminc[2] + 1),
        },
        "validation": {"validation-2": str(vitaminc[4] + 1)},
    }

    options = {task: {"path": str(root / task), "cache_dir": cache} for task in ("logiqa", "math", "mbpp", "bigbench")}
    options["math"]["subjects"] = ["algebra"]
    return options, expected


def test_guard_drops_official_test_questions_from_the_hub_splits(official_dir, tmp_path):
    hub_options, expected = build_hub_copies(official_dir, tmp_path / "hub")
    data = {"source": "hub", "test_source": "official", "official_dir": str(official_dir), "hub_options": hub_options}
    params = load_params(None, {"data": data})
    prepared = prepare_data(params.data, seed=0)

    for task, splits in expected.items():
        assert prepared[task].dropped == splits, task
    kept = {
        task: {split: [item.id for item in td.splits[split]] for split in ("train", "validation")}
        for task, td in prepared.items()
    }
    assert kept["logiqa"] == {"train": ["train-2"], "validation": ["validation-1"]}
    assert kept["math"] == {"train": ["train-3", "train-4"], "validation": []}  # the near miss is kept
    assert kept["mbpp"] == {"train": ["train-9002"], "validation": ["validation-9003"]}
    assert kept["bigbench"] == {"train": ["train-2"], "validation": ["validation-1"]}  # another claim is kept
    assert all(td.counts()["test"] == 500 for td in prepared.values())

    written = write_data(prepared, tmp_path / "data")
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert tmp_path / "data" / "summary.json" in written
    assert summary["decontamination"]["enabled"] is True
    assert summary["decontamination"]["dropped"] == {
        "logiqa": {"train": 2, "validation": 1},
        "math": {"train": 2, "validation": 0},
        "mbpp": {"train": 3, "validation": 1},
        "bigbench": {"train": 4, "validation": 1},
    }
    assert summary["decontamination"]["matches"] == expected
    assert summary["counts"]["bigbench"] == {"train": 1, "validation": 1, "test": 500}
    assert summary["test_cuts"] == {}  # the test split comes from the official files: nothing is cut
    manifest_entry = data_summary(prepared, matches=False)
    assert "matches" not in manifest_entry["decontamination"]
    assert manifest_entry["decontamination"]["dropped"] == summary["decontamination"]["dropped"]
    note = data_note(tmp_path / "data", "test")
    assert "Contamination guard on (data.decontaminate): 11 train and 3 validation items" in note
    assert "bigbench: train 4, validation 1" in note and "math: train 2, validation 0" in note

    # the guard off: every planted row stays, and the summary, manifest and report say the guard was off
    off = load_params(None, {"data": {**data, "decontaminate": False}})
    unguarded = prepare_data(off.data, seed=0)
    for task, splits in expected.items():
        for split, dropped in splits.items():
            assert set(dropped) <= {item.id for item in unguarded[task].splits[split]}, (task, split)
    assert unguarded["bigbench"].counts() == {"train": 5, "validation": 2, "test": 500}
    write_data(unguarded, tmp_path / "unguarded")
    summary = json.loads((tmp_path / "unguarded" / "summary.json").read_text())
    assert summary["decontamination"]["enabled"] is False
    assert all(counts == {"train": 0, "validation": 0} for counts in summary["decontamination"]["dropped"].values())
    assert "Contamination guard OFF (data.decontaminate: false)" in data_note(tmp_path / "unguarded", "test")
    assert off.to_dict()["data"]["decontaminate"] is False  # the resolved params the manifest records


def test_guard_runs_whatever_the_sources(official_dir, tmp_path):
    """A file split by fractions can hold the same question twice: a copy that lands in train or validation
    while its twin is a test item is dropped; the test split is never touched."""
    rows = _official_rows(official_dir, "math")
    with open(tmp_path / "math_test.jsonl", "w", encoding="utf-8") as handle:
        for row in rows + [{**row, "problem": _shout(row["problem"])} for row in rows[:100]]:
            handle.write(json.dumps(row) + "\n")
    data = {"tasks": ["math"], "source": "official", "official_dir": str(tmp_path), "check_sha256": False}
    guarded = prepare_data(load_params(None, {"data": data}).data, seed=0)["math"]
    unguarded = prepare_data(load_params(None, {"data": {**data, "decontaminate": False}}).data, seed=0)["math"]

    split_of = {item.id: split for split, items in unguarded.splits.items() for item in items}
    twins = {str(501 + i): str(1 + i) for i in range(100)}  # the copy's id -> the original's id
    pairs = list(twins.items()) + [(original, copy) for copy, original in twins.items()]
    expected = {"train": {}, "validation": {}}
    for item_id, twin_id in pairs:
        if split_of[item_id] != "test" and split_of[twin_id] == "test":
            expected[split_of[item_id]][item_id] = twin_id
    assert sum(map(len, expected.values())) > 0  # the seed spreads some pairs across test and the rest
    assert guarded.dropped == expected
    assert guarded.splits["test"] == unguarded.splits["test"]
    for split in ("train", "validation"):
        assert len(guarded.splits[split]) == len(unguarded.splits[split]) - len(expected[split])


def test_samples_have_nothing_to_drop():
    prepared = prepare_data(load_params(None, {}).data, seed=0)
    assert all(td.decontaminated and td.dropped == {"train": {}, "validation": {}} for td in prepared.values())


# ---- the evaluated split -------------------------------------------------------------------------------
def _bigbench_hub(root: Path, n_train: int, n_validation: int) -> dict:
    rows = [
        _vitaminc_row(f"Passage: Passage {i}.\nClaim: Claim {i}.\nOptions:\nA. True\nB. False", "a", i)
        for i in range(n_train + n_validation)
    ]
    _parquet(rows[:n_train], root / VITAMINC / "train-00000-of-00001.parquet")
    _parquet(rows[n_train:], root / VITAMINC / "validation-00000-of-00001.parquet")
    _configs_readme(root, {VITAMINC: ["train", "validation"]})
    return {"bigbench": {"path": str(root), "cache_dir": str(root / "cache")}}


def test_hub_bigbench_gets_a_seeded_test_split_cut_from_its_validation_split(tmp_path):
    hub_options = _bigbench_hub(tmp_path / "bigbench", n_train=4, n_validation=10)
    params = load_params(None, {"data": {"tasks": ["bigbench"], "source": "hub", "hub_options": hub_options}})
    prepared = prepare_data(params.data, seed=0)["bigbench"]
    assert prepared.counts() == {"train": 4, "validation": 5, "test": 5}  # validation 0.1 : test 0.1
    test_ids = [item.id for item in prepared.splits["test"]]
    assert all(item_id.startswith("validation-") for item_id in test_ids)
    assert prepared.sources["test"] == "hub:tasksource/bigbench (validation split, seeded test cut)"
    assert prepared.test_cut == {
        "from_split": "validation",
        "test_share": 0.5,
        "moved": 5,
        "kept": 5,
        "seed_purpose": "hub-test-cut",
    }
    assert [item.id for item in prepare_data(params.data, seed=0)["bigbench"].splits["test"]] == test_ids
    assert [item.id for item in prepare_data(params.data, seed=1)["bigbench"].splits["test"]] != test_ids
    assert check_eval_splits({"bigbench": prepared}, params) == []

    write_data({"bigbench": prepared}, tmp_path / "data")
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert summary["test_cuts"]["bigbench"]["from_split"] == "validation"
    assert summary["sources"]["bigbench"]["test"].endswith("(validation split, seeded test cut)")
    note = data_note(tmp_path / "data", "test")
    assert "bigbench: the test split is a seeded cut of the hub's validation split (5 items" in note

    shares = load_params(
        None,
        {
            "data": {
                "tasks": ["bigbench"],
                "source": "hub",
                "hub_options": hub_options,
                "split_fractions": {"train": 0.5, "validation": 0.2, "test": 0.3},
            }
        },
    )
    assert prepare_data(shares.data, seed=0)["bigbench"].counts() == {"train": 4, "validation": 4, "test": 6}


def test_an_empty_eval_split_stops_stage_01_unless_allowed(tmp_path):
    hub_options = _bigbench_hub(tmp_path / "bigbench", n_train=4, n_validation=4)
    data = {
        "tasks": ["logiqa", "bigbench"],
        "source": "hub",
        "hub_options": hub_options,
        "split_fractions": {"train": 0.8, "validation": 0.2, "test": 0.0},
    }
    (tmp_path / "logiqa" / "data").mkdir(parents=True)
    for offset, split in enumerate(("train", "validation", "test")):
        rows = [_fresh_logiqa(10 * offset + i) for i in range(2)]  # other questions per split: nothing to drop
        _parquet(rows, tmp_path / "logiqa" / "data" / f"{split}-00000-of-00001.parquet")
    data["hub_options"]["logiqa"] = {"path": str(tmp_path / "logiqa"), "cache_dir": str(tmp_path / "cache")}
    params = load_params(None, {"data": data})
    prepared = prepare_data(params.data, seed=0)
    assert prepared["bigbench"].counts()["test"] == 0 and prepared["bigbench"].test_cut is None
    refusal = r"bigbench have no items in the 'test' split.*eval.split: test.*data.allow_empty_eval"
    with pytest.raises(DataError, match=refusal):
        check_eval_splits(prepared, params)
    assert check_eval_splits(prepared, load_params(None, {"data": data, "eval": {"split": "validation"}})) == []

    allowed = load_params(None, {"data": {**data, "allow_empty_eval": ["bigbench"]}})
    prepared = prepare_data(allowed.data, seed=0)
    assert check_eval_splits(prepared, allowed) == ["bigbench"]
    write_data(prepared, tmp_path / "data")
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert summary["allow_empty_eval"] == ["bigbench"]
    assert summary["eval_exclusions"] == {"validation": [], "test": ["bigbench"]}
    assert eval_exclusions(tmp_path / "data", allowed) == ["bigbench"]  # what stage 05 calls
    with pytest.raises(DataError, match="bigbench have no items"):
        eval_exclusions(tmp_path / "data", params)  # the params changed since stage 01: still refused
    note = data_note(tmp_path / "data", "test")
    assert "Left out of evaluation, with no `test` items (data.allow_empty_eval): bigbench" in note

    only_bigbench = load_params(
        None,
        {
            "data": {
                **data,
                "tasks": ["bigbench"],
                "allow_empty_eval": ["bigbench"],
                "hub_options": {"bigbench": hub_options["bigbench"]},
            }
        },
    )
    with pytest.raises(DataError, match="nothing to evaluate"):
        check_eval_splits({"bigbench": {"train": 4, "validation": 4, "test": 0}}, only_bigbench)


def test_allow_empty_eval_names_tasks_of_the_run():
    with pytest.raises(ConfigError, match=r"allow_empty_eval names task\(s\) \['math'\]"):
        load_params(None, {"data": {"tasks": ["logiqa"], "allow_empty_eval": ["math"]}})
    with pytest.raises(ConfigError, match="allow_empty_eval is listed twice"):
        load_params(None, {"data": {"tasks": ["logiqa"], "allow_empty_eval": ["logiqa", "logiqa"]}})


def test_the_cpu_recipe_evaluates_every_task():
    params = load_params(REPO / "params" / "smollm2-135m-cpu.yaml")
    assert params.data.source == "hub" and params.data.test_source is None
    assert params.data.allow_empty_eval == [] and params.data.decontaminate
