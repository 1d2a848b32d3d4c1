"""Property-based fuzzing of what users hand the package: params files (and the sections papermill
injects) and JSONL data rows.

The property everywhere: an input is either accepted, or refused with a :class:`ReflectEvoError`
whose message names the offending key (params) or ``file:line`` (data) -- never an exception from
deep inside a library -- and nothing is written. Mutations are realistic mistakes: a wrong type,
an out-of-range number, NaN, a typo in a key, a truncated or re-indented file, bytes that are not
UTF-8, a byte-order mark, CRLF line endings, a row with a field missing or nested junk in it.

Runs are reproducible (``derandomize=True``, no example database). Every property counts the
inputs it tried; the last test prints the totals (shown even without ``-s``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
import string
import tempfile
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REQUIRE_FULL, official_data_dir
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from reflectevo import prompts
from reflectevo.cli.main import main as cli_main
from reflectevo.config import SECTIONS, Params, load_params
from reflectevo.data.prepare import load_run_items
from reflectevo.errors import DataError, ReflectEvoError
from reflectevo.generation.engines import ReplayEngine
from reflectevo.generation.requests import GenerationRequest, GenerationSettings
from reflectevo.reflection import curation, released
from reflectevo.tasks import get_task
from reflectevo.tasks.base import write_items

REPO = Path(__file__).resolve().parents[1]
RECIPES = {path.name: path for path in sorted((REPO / "params").glob("*.yaml"))}
TASK_NAMES = ("logiqa", "math", "mbpp", "bigbench")

TRIED: Counter[str] = Counter()  # property -> inputs tried
OUTCOMES: Counter[tuple[str, str]] = Counter()  # (property, "accepted" | "refused") -> inputs


def fuzz(examples: int):
    """Hypothesis settings for one property: reproducible, no deadline (the machine is shared)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


def count(prop: str, accepted: bool) -> None:
    TRIED[prop] += 1
    OUTCOMES[prop, "accepted" if accepted else "refused"] += 1


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


# ---- params: schema paths, junk values, typos ------------------------------------------------------
def _schema_paths(model: type[BaseModel] = Params, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        paths.append((*prefix, name))
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += _schema_paths(annotation, (*prefix, name))
    return paths


def _fields_at(path: tuple[str, ...]) -> set[str]:
    model: Any = Params
    for part in path:
        model = model.model_fields[part].annotation
    return set(model.model_fields)


SCHEMA_PATHS = _schema_paths()  # every key of the schema, sections and nested models included


def _is_model_path(path: tuple[str, ...]) -> bool:
    model: Any = Params
    for part in path:
        model = model.model_fields[part].annotation
    return isinstance(model, type) and issubclass(model, BaseModel)


MODEL_PATHS = [(), *(path for path in SCHEMA_PATHS if _is_model_path(path))]  # where an unknown key can go

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=16))
PARAM_JUNK = st.one_of(
    # the values people actually get wrong: negative counts, fractions above 1, NaN, empty things
    st.sampled_from(
        [
            None,
            "",
            " ",
            [],
            {},
            -1,
            0,
            -0.5,
            1.5,
            2,
            10**30,
            -(10**30),
            2**63,
            float("nan"),
            float("inf"),
            float("-inf"),
            True,
            False,
            "auto",
            "yes",
            "1e-3",
            "none",
            [None],
            [""],
            [1, 2],
            {"a": 1},
            {"nested": {"deeper": []}},
            "logiqa",
            ["logiqa"],
            ["math", "math"],
            "cpu",
            "train",
            "official",
            "replay",
            "trained",
            ["sft/one_stage"],
            "two_stage",
        ]
    ),
    _SCALARS,
    st.lists(st.one_of(st.integers(), st.text(max_size=6), st.none()), max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=6), st.one_of(st.integers(), st.text(max_size=6)), max_size=2),
)


# the mistakes people make with a field of each type, drawn half of the time (the rest is any junk)
NUMBER_MISTAKES = [
    -1,
    -100,
    0,
    1.5,
    2,
    -0.5,
    1.0000001,
    10**30,
    -(10**30),
    2**63,
    2**64,
    float("nan"),
    float("inf"),
    float("-inf"),
    "1e-3",
    "16",
    "",
    True,
    None,
    [],
    {"value": 3},
]
TEXT_MISTAKES = [
    "",
    " ",
    None,
    0,
    1.5,
    True,
    [],
    {},
    {"a": 1},
    ["x"],
    "x" * 300,
    "auto ",
    "Transformers",
    "CPU",
    "a b",
    "name/with/slash",
    "\u00e9t\u00e9",
    "-leading-dash",
]
LIST_MISTAKES = [
    [],
    "logiqa",
    ["logiqa", "logiqa"],
    [None],
    [1],
    [[]],
    {},
    None,
    [""],
    ["unknown"],
    ["Logiqa"],
    {"logiqa": True},
    ["one_stage", "ONE_STAGE"],
]


def _annotation(path: tuple[str, ...]) -> str:
    model: Any = Params
    for part in path[:-1]:
        model = model.model_fields[part].annotation
    return repr(model.model_fields[path[-1]].annotation)


def junk_for(path: tuple[str, ...]) -> st.SearchStrategy:
    kind = _annotation(path)
    mistakes = (
        LIST_MISTAKES if "list" in kind else NUMBER_MISTAKES if ("int" in kind or "float" in kind) else TEXT_MISTAKES
    )
    return st.one_of(st.sampled_from(mistakes), PARAM_JUNK)


@st.composite
def typo_of(draw, word: str) -> str:
    """A misspelling of ``word``: letters swapped, dropped, doubled or added, case, separators."""
    kind = draw(st.sampled_from(["swap", "drop", "double", "insert", "upper", "separator", "plural", "space"]))
    i = draw(st.integers(0, max(0, len(word) - 1)))
    if kind == "swap" and len(word) > 1:
        i = min(i, len(word) - 2)
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == "drop" and len(word) > 1:
        return word[:i] + word[i + 1 :]
    if kind == "double":
        return word[:i] + word[i] + word[i:]
    if kind == "insert":
        return word[:i] + draw(st.sampled_from(string.ascii_lowercase)) + word[i:]
    if kind == "upper":
        return word.capitalize() if word != word.capitalize() else word.upper()
    if kind == "separator" and "_" in word:
        return word.replace("_", draw(st.sampled_from(["-", " ", ""])), 1)
    if kind == "space":
        return word + " "
    return word + "s"


def set_at(data: dict, path: tuple, value: Any) -> None:
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


@st.composite
def params_mutation(draw) -> tuple[str, dict, tuple, str]:
    """(recipe file name, its dict with one mistake, the key path to blame, the kind of mistake)."""
    name = draw(st.sampled_from(sorted(RECIPES)))
    data = copy.deepcopy(recipe_dict(name))
    kind = draw(
        st.sampled_from(["wrong_value", "wrong_value", "typo", "unknown_key", "non_string_key", "section_not_mapping"])
    )
    if kind == "wrong_value":
        path = draw(st.sampled_from(SCHEMA_PATHS))
        set_at(data, path, draw(junk_for(path)))
        return name, data, path, kind
    if kind == "typo":
        path = draw(st.sampled_from(SCHEMA_PATHS))
        typo = draw(typo_of(path[-1]))
        assume(typo not in _fields_at(path[:-1]))
        parent: Any = data
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent.get(part), dict) else {}
        value = parent.pop(path[-1]) if path[-1] in parent else draw(PARAM_JUNK)
        set_at(data, (*path[:-1], typo), value)
        return name, data, (*path[:-1], typo), kind
    if kind == "unknown_key":
        parent_path = draw(st.sampled_from(MODEL_PATHS))
        key = draw(st.text(string.ascii_lowercase + "_", min_size=1, max_size=12))
        assume(key not in _fields_at(parent_path))
        set_at(data, (*parent_path, key), draw(PARAM_JUNK))
        return name, data, (*parent_path, key), kind
    if kind == "non_string_key":
        parent_path = draw(st.sampled_from(MODEL_PATHS))
        key = draw(st.sampled_from([1, 0, -3, 2.5, None]))
        set_at(data, (*parent_path, key), draw(PARAM_JUNK))
        return name, data, (*parent_path, key), kind
    section = draw(st.sampled_from(SECTIONS))
    data[section] = draw(st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3)))
    return name, data, (section,), kind


@cache
def recipe_text(name: str) -> str:
    return RECIPES[name].read_text(encoding="utf-8")


@cache
def recipe_dict(name: str) -> dict:
    return yaml.safe_load(recipe_text(name))


def names_key(message: str, key: tuple) -> bool:
    """The message names the dotted key path, or its parent section on a line that names the key
    (a check across keys, such as ``shard_index`` below ``num_shards``, is reported at the parent)."""
    full = ".".join(str(part) for part in key)
    if re.search(rf"(?<![\w.-]){re.escape(full)}(?![\w-])", message):
        return True
    leaf = re.escape(str(key[-1]))
    for depth in range(len(key) - 1, -1, -1):
        parent = ".".join(str(part) for part in key[:depth]) or "(top level)"
        for line in message.splitlines():
            if line.strip().startswith(f"{parent}:") and re.search(rf"(?<![\w-]){leaf}(?![\w-])", line):
                return True
    return False


def check_resolved(params: Params) -> None:
    """What validation accepts must be usable downstream: finite numbers, integers torch can hold."""

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{where}.{index}")
        elif isinstance(value, float):
            assert math.isfinite(value), f"{where} accepted a non-finite number {value}"
        elif isinstance(value, int) and not isinstance(value, bool):
            assert -(2**63) <= value < 2**63, f"{where} accepted an integer beyond 64 bits"

    resolved = params.to_dict()
    for section in SECTIONS:
        if section != "data":  # data.hub_options is passed through to the hub loader as given
            walk(resolved[section], section)
    assert len(params.hash()) == 64


def write_yaml(folder: Path, data: Any) -> Path:
    path = folder / "bad.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


# ---- property 1: params files ------------------------------------------------------------------
@fuzz(800)
@given(params_mutation())
def test_params_mutation_is_accepted_or_refused_naming_key_and_file(mutation):
    _name, data, key, kind = mutation
    with tempfile.TemporaryDirectory() as tmp:
        path = write_yaml(Path(tmp), data)
        try:
            params = load_params(path)
        except ReflectEvoError as exc:
            count("params: one key mutated", accepted=False)
            message = str(exc)
            assert str(path) in message, message
            assert names_key(message, key), f"{kind} at {key}: the message does not name the key:\n{message}"
        else:
            count("params: one key mutated", accepted=True)
            assert kind in ("wrong_value", "section_not_mapping"), f"{kind} at {key} was accepted"
            check_resolved(params)


BAD_BYTES = [b"\xff", b"\xfe\xff", b"\xc3(", b"\xed\xa0\x80", b"\x80abc", b"\xe2\x82"]


@st.composite
def broken_params_text(draw) -> tuple[bytes, str, int | None]:
    """(file bytes, the kind of damage, the line of a bad byte when that line is certain)."""
    name = draw(st.sampled_from(sorted(RECIPES)))
    text = recipe_text(name)
    lines = text.splitlines(keepends=True)
    n = draw(st.integers(0, len(lines) - 1))
    kind = draw(
        st.sampled_from(
            [
                "truncate",
                "tab",
                "indent",
                "bracket",
                "top_level",
                "not_utf8",
                "empty",
                "bom_crlf",
                "duplicate_line",
                "control",
                "replace_char",
            ]
        )
    )
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text)))].encode(), kind, None
    if kind == "tab":
        lines[n] = "\t" + lines[n]
    elif kind == "indent":
        stripped = lines[n].lstrip(" ")
        lines[n] = " " * draw(st.sampled_from([0, 1, 3, 5, 8])) + stripped
    elif kind == "bracket":
        at = draw(st.integers(0, len(lines[n].rstrip("\n"))))
        lines[n] = (
            lines[n][:at]
            + draw(st.sampled_from(["[", "]", "{", "}", "'", '"', ": ", "- ", "&", "*", "!"]))
            + lines[n][at:]
        )
    elif kind == "top_level":
        return (
            draw(
                st.sampled_from(
                    [
                        b"- run\n- model\n",
                        b"[1, 2]\n",
                        b"just some text\n",
                        b"42\n",
                        b"true\n",
                        b"'quoted'\n",
                        b"- " + text.encode(),
                    ]
                )
            ),
            kind,
            None,
        )
    elif kind == "not_utf8":
        raw = [line.encode() for line in lines]
        at = draw(st.integers(0, len(raw[n].rstrip(b"\n"))))
        raw[n] = raw[n][:at] + draw(st.sampled_from(BAD_BYTES)) + raw[n][at:]
        return b"".join(raw), kind, n + 1
    elif kind == "empty":
        return (
            draw(st.sampled_from([b"", b"\n\n", b"   \n", b"# only a comment\n", b"---\n", b"~\n", b"null\n"])),
            kind,
            None,
        )
    elif kind == "bom_crlf":
        out = text.replace("\n", "\r\n") if draw(st.booleans()) else text
        return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + out.encode(), kind, None
    elif kind == "duplicate_line":
        lines.insert(n, lines[n])
    elif kind == "control":
        at = draw(st.integers(0, len(lines[n].rstrip("\n"))))
        lines[n] = lines[n][:at] + draw(st.sampled_from(["\x00", "\x07", "\x1b", "\x7f", "\ufffe"])) + lines[n][at:]
    else:
        at = draw(st.integers(0, max(0, len(lines[n]) - 1)))
        lines[n] = lines[n][:at] + draw(st.characters(codec="utf-8")) + lines[n][at + 1 :]
    return "".join(lines).encode("utf-8", "surrogatepass"), kind, None


@fuzz(500)
@given(broken_params_text())
def test_broken_params_text_is_refused_naming_file_and_line(case):
    raw, kind, bad_line = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.yaml"
        path.write_bytes(raw)
        try:
            params = load_params(path)
        except ReflectEvoError as exc:
            count("params: file text damaged", accepted=False)
            message = str(exc)
            assert message.startswith(str(path)), message
            if "not valid YAML" in message or "not UTF-8" in message:
                line = re.match(rf"{re.escape(str(path))}:(\d+):", message)
                assert line is not None, f"a syntax error without its line: {message}"
                assert 1 <= int(line.group(1)) <= raw.count(b"\n") + 1, message
            if bad_line is not None:
                assert message.startswith(f"{path}:{bad_line}:"), message
        else:
            count("params: file text damaged", accepted=True)
            assert kind not in ("top_level", "not_utf8", "empty", "tab"), f"{kind} was accepted"
            check_resolved(params)


SECTION_KEYS = st.one_of(
    st.sampled_from([*SECTIONS, "Run", "runs", "sft ", "", "params", "model_name"]),
    st.text(max_size=8),
    st.integers(),
    st.none(),
)


@fuzz(300)
@given(
    recipe=st.one_of(st.none(), st.sampled_from(sorted(RECIPES))),
    sections=st.one_of(
        st.dictionaries(
            SECTION_KEYS,
            st.one_of(
                PARAM_JUNK,
                st.dictionaries(
                    st.sampled_from(["name", "seed", "tasks", "temperature", "modes", "nmae", "batch_size"]),
                    PARAM_JUNK,
                    max_size=2,
                ),
            ),
            max_size=3,
        ),
        _SCALARS,
        st.lists(_SCALARS, max_size=3),
        st.just([("run", {"seed": 1})]),
    ),
)
def test_injected_sections_are_accepted_or_refused_naming_the_key(recipe, sections):
    """What papermill injects (a mapping of whole sections) with wrong types and names."""
    try:
        params = load_params(RECIPES[recipe] if recipe else None, sections)
    except ReflectEvoError as exc:
        count("params: injected sections", accepted=False)
        message = str(exc)
        if sections is not None and not isinstance(sections, dict):
            assert "sections must be a mapping" in message, message
        else:
            assert any(str(key) in message or repr(key) in message for key in sections), message
    else:
        count("params: injected sections", accepted=True)
        check_resolved(params)


# ---- property 2: an invalid params file writes nothing --------------------------------------------
COMMANDS = [
    ["run", "bad.yaml"],
    ["run", "bad.yaml", "--dry-run"],
    ["run", "bad.yaml", "--force", "--from", "02"],
    ["train", "sft", "bad.yaml"],
    ["train", "dpo", "bad.yaml"],
    ["eval", "bad.yaml"],
]


@fuzz(60)
@given(mutation=params_mutation(), command=st.sampled_from(COMMANDS))
def test_cli_with_an_invalid_params_file_fails_and_writes_nothing(mutation, command):
    _name, data, key, _kind = mutation
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write_yaml(folder, data)
        try:
            load_params(path)
        except ReflectEvoError:
            pass
        else:
            assume(False)  # a valid file would start a real run
        stderr, stdout = io.StringIO(), io.StringIO()
        with contextlib.chdir(folder), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            status = cli_main(command)
        count("cli: invalid params file", accepted=False)
        assert status == 2, stdout.getvalue() + stderr.getvalue()
        assert stderr.getvalue().startswith("error: bad.yaml"), stderr.getvalue()
        assert names_key(stderr.getvalue(), key), stderr.getvalue()
        assert files_under(folder) == {"bad.yaml"}, f"{command} wrote {files_under(folder) - {'bad.yaml'}}"


# ---- data rows: mutations of one row in a JSONL file ------------------------------------------------
ODD_TEXT = [
    "\u202e",
    "\ufeff",
    "\u0000",
    "\u2028",
    "\U0001f600",
    "e\u0301",
    "\ud83d",
    "\x85",
    "\u00a0",
    "\\",
    '"',
    "\n",
]
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12))
TYPE_SWAPS = [None, 0, 1, -1, 1.5, True, False, "", "x", [], ["a"], [1], {}, {"a": 1}]  # a field of the wrong JSON type
JSON_JUNK = st.one_of(
    st.sampled_from(TYPE_SWAPS),
    st.sampled_from(
        [
            None,
            "",
            " ",
            "\t\n",
            0,
            -1,
            1.5,
            True,
            False,
            [],
            {},
            [None],
            [""],
            {"": None},
            10**40,
            "null",
            "[]",
            float("nan"),
            float("inf"),
            "x" * 100_000,
            {"a": {"b": [None, {}]}},
        ]
    ),
    JSON_SCALARS,
    st.lists(JSON_SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=5), JSON_SCALARS, max_size=3),
)


@st.composite
def mutate_tree(draw, row: dict) -> dict:
    """One spot of ``row`` (a field, or something nested inside one) dropped, replaced or wrapped."""
    row = copy.deepcopy(row)
    parent: Any = row
    key: Any = draw(st.sampled_from(sorted(row))) if row else None
    while key is not None and isinstance(parent[key], (dict, list)) and parent[key] and draw(st.booleans()):
        parent = parent[key]
        key = (
            draw(st.sampled_from(sorted(parent))) if isinstance(parent, dict) else draw(st.integers(0, len(parent) - 1))
        )
    operation = draw(
        st.sampled_from(["set", "set", "drop", "add", "wrap_list", "wrap_dict", "empty", "stringify", "odd_text"])
    )
    if key is None or operation == "add":
        target = parent if isinstance(parent, dict) else row
        target[draw(st.text(min_size=1, max_size=10))] = draw(JSON_JUNK)
    elif operation == "drop":
        del parent[key]
    elif operation == "set":
        parent[key] = draw(JSON_JUNK)
    elif operation == "wrap_list":
        parent[key] = [parent[key]]
    elif operation == "wrap_dict":
        parent[key] = {"value": parent[key]}
    elif operation == "empty":
        parent[key] = draw(st.sampled_from(["", " ", "\n", [], {}]))
    elif operation == "stringify":
        parent[key] = json.dumps(parent[key])
    elif isinstance(parent[key], str):
        at = draw(st.integers(0, len(parent[key])))
        parent[key] = parent[key][:at] + draw(st.sampled_from(ODD_TEXT)) + parent[key][at:]
    else:
        parent[key] = draw(st.sampled_from(ODD_TEXT))
    return row


def dump_row(row: Any, ascii_only: bool) -> bytes:
    # surrogatepass: a lone surrogate (a broken emoji) becomes bytes that are not UTF-8, as an editor would save it
    return json.dumps(row, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


LINE_DAMAGE = ["truncate", "not_object", "garbage", "bad_utf8", "huge_number", "deep", "lone_surrogate", "control"]


@st.composite
def damage_line(draw, line: bytes) -> bytes:
    kind = draw(st.sampled_from(LINE_DAMAGE))
    at = draw(st.integers(0, len(line)))
    if kind == "truncate":
        return line[: draw(st.integers(1, len(line) - 1))]
    if kind == "not_object":
        return dump_row(
            draw(st.one_of(JSON_SCALARS, st.lists(JSON_SCALARS, max_size=3), st.just([json.loads(line)]))), True
        )
    if kind == "garbage":
        return line[:at] + draw(st.text(min_size=1, max_size=3)).encode("utf-8") + line[at:]
    if kind == "bad_utf8":
        return line[:at] + draw(st.sampled_from(BAD_BYTES)) + line[at:]
    if kind == "huge_number":
        return line[:-1] + b', "n": ' + b"7" * draw(st.sampled_from([20, 4300, 5000])) + b"}"
    if kind == "deep":
        depth = draw(st.sampled_from([30, 3000, 100_000]))
        return line[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "lone_surrogate":
        return line.replace(b'": "', b'": "\\ud83d', 1)
    return line[:at] + draw(st.sampled_from([b"\x00", b"\x07", b"\r", b"\t", b"\x1b"])) + line[at:]


@st.composite
def jsonl_with_one_bad_row(draw, rows: list[dict], row_mutation: Callable | None = None) -> tuple[bytes, int]:
    """The rows as a JSONL file, one of them mutated (its fields) or damaged (its text), with blank
    lines, CRLF endings or a byte-order mark around them; returns (bytes, line of that row)."""
    rows = copy.deepcopy(rows)
    target = draw(st.integers(0, len(rows) - 1))
    ascii_only = draw(st.booleans())
    lines = [dump_row(row, ascii_only) for row in rows]
    if draw(st.integers(0, 2)):
        lines[target] = dump_row(draw((row_mutation or mutate_tree)(rows[target])), ascii_only)
    else:
        lines[target] = draw(damage_line(lines[target]))
    tagged = [(index == target, line) for index, line in enumerate(lines)]
    for position in draw(st.lists(st.integers(0, len(tagged)), max_size=3)):
        tagged.insert(position, (False, draw(st.sampled_from([b"", b"  ", b"\t"]))))
    line = next(number for number, (is_target, _) in enumerate(tagged, start=1) if is_target)
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    return bom + eol.join(text for _, text in tagged) + (eol if draw(st.booleans()) else b""), line


REFUSED = object()  # what load_or_refused returns when the loader refused the file


def load_or_refused(
    label: str, path: Path, raw: bytes, line: int, load: Callable[[Path], Any], error: type[Exception] = DataError
) -> Any:
    """Write ``raw`` to ``path`` and ``load`` it: what it returned, counted as accepted, or
    :data:`REFUSED` after checking that the refusal names ``path:line``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    try:
        loaded = load(path)
    except error as exc:
        count(label, accepted=False)
        assert_names_line(exc, path, line)
        return REFUSED
    count(label, accepted=True)
    return loaded


def assert_names_line(exc: Exception, path: Path, line: int) -> None:
    message = str(exc)
    assert message.startswith(f"{path}:"), message
    named = {int(n) for n in re.findall(rf"{re.escape(str(path))}:(\d+)", message)}
    named |= {int(n) for n in re.findall(r"\bline (\d+)", message)}
    assert line in named, f"the mutated row is on line {line}; the error names {sorted(named)}: {message[:500]}"


def check_item(item: Any) -> None:
    for name in ("task", "id", "question", "gold", "setup_code"):
        assert isinstance(getattr(item, name), str), (name, item)
    assert item.id and item.question.strip() and item.gold.strip(), item
    assert all(isinstance(text, str) for text in (*item.options, *item.tests)), item


# ---- property 3: official benchmark rows ----------------------------------------------------------
@cache
def official_rows(task_name: str) -> tuple[dict, ...]:
    """The first rows of the official file; without it, rows in the official schema made from the
    built-in samples (CI, which sets REFLECTEVO_REQUIRE_FULL_TESTS, must have the file)."""
    task = get_task(task_name)
    path = official_data_dir() / task.official_file
    if path.is_file():
        with path.open(encoding="utf-8") as handle:
            return tuple(json.loads(next(handle)) for _ in range(12))
    if REQUIRE_FULL:
        pytest.fail(f"official file {path} not found (REFLECTEVO_REQUIRE_FULL_TESTS=1)")
    rows = []
    for index, item in enumerate(task.load_samples()[:12]):
        if task_name == "math":
            rows.append(
                {"problem": item.question, "level": "Level 1", "type": "Algebra", "solution": item.metadata["solution"]}
            )
        elif task_name == "mbpp":
            rows.append(
                {
                    "text": item.metadata["text"],
                    "code": item.gold,
                    "task_id": 900 + index,
                    "test_setup_code": "",
                    "test_list": item.tests,
                    "challenge_test_list": [],
                }
            )
        else:
            rows.append({"id": index, "question": item.question, "answer": item.gold})
    return tuple(rows)


@st.composite
def official_file(draw) -> tuple[str, bytes, int, int]:
    task_name = draw(st.sampled_from(TASK_NAMES))
    pool = official_rows(task_name)
    chosen = draw(st.lists(st.integers(0, len(pool) - 1), min_size=2, max_size=5, unique=True))
    raw, line = draw(jsonl_with_one_bad_row([pool[i] for i in chosen]))
    return task_name, raw, line, len(chosen)


@fuzz(800)
@given(official_file())
def test_official_rows_load_or_fail_at_their_line(case):
    task_name, raw, line, n_rows = case
    task = get_task(task_name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / task.official_file
        items = load_or_refused("data: official rows", path, raw, line, task.load_official)
        if items is REFUSED:
            assert files_under(Path(tmp)) == {path.name}
            return
        assert len(items) == n_rows
        for item in items:
            check_item(item)
        # what stage 01 does with them: written in the unified schema and read back unchanged
        copy_path = write_items(items, Path(tmp) / "items.jsonl")
        assert task.load_items(copy_path) == items


# ---- run item files (stage 01's output, read back by every later stage) ----------------------------
@st.composite
def run_item_file(draw) -> tuple[str, str, bytes, int, int, str]:
    task_name = draw(st.sampled_from(TASK_NAMES))
    split = draw(st.sampled_from(["train", "validation", "test"]))
    pool = [item.to_dict() for item in get_task(task_name).load_samples(split)]
    chosen = draw(st.lists(st.integers(0, len(pool) - 1), min_size=2, max_size=4, unique=True))
    raw, line = draw(jsonl_with_one_bad_row([pool[i] for i in chosen]))
    reader = draw(st.sampled_from(["load_run_items", "load_file"]))
    return task_name, split, raw, line, len(chosen), reader


@fuzz(500)
@given(run_item_file())
def test_run_item_rows_load_or_fail_at_their_line(case):
    task_name, split, raw, line, n_rows, reader = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data" / task_name / f"{split}.jsonl"

        def load(path: Path) -> list:
            if reader == "load_run_items":
                return load_run_items(Path(tmp) / "data", task_name, split)
            return get_task(task_name).load_file(path)  # `reflectevo grade --data FILE`: either schema

        items = load_or_refused("data: run item rows", path, raw, line, load)
        if items is REFUSED:
            assert files_under(Path(tmp)) == {"data", f"data/{task_name}", f"data/{task_name}/{split}.jsonl"}
            return
        assert len(items) == n_rows and len({item.id for item in items}) == n_rows
        for item in items:
            check_item(item)


# ---- replay rows (generation.engine: replay) --------------------------------------------------------
REPLAY_ROWS = [
    {"key": "logiqa/1/t1", "text": "Thought: B.\nAction: Finish[B]"},
    {"key": "logiqa/2/t1", "text": "Action: Finish[C]", "finish_reason": "length", "sample": 0},
    {
        "key": "math/7/1-2-1/1",
        "sample": 1,
        "text": "Finish<<<3>>>",
        "finish_reason": "stop",
        "prompt": "<p>",
        "settings": {"n": 2, "temperature": 0.8},
        "prompt_tokens": 12,
        "new_tokens": 4,
        "engine": "transformers",
        "batch": 3,
        "stage": "reflect",
    },
    {"key": "mbpp/11/t1", "text": "[BEGIN]\ndef f():\n    return 1\n[END]", "stage": "first_trial"},
]


@fuzz(400)
@given(st.data())
def test_replay_rows_load_or_fail_at_their_line(data):
    chosen = data.draw(st.lists(st.integers(0, len(REPLAY_ROWS) - 1), min_size=2, max_size=4, unique=True))
    raw, line = data.draw(jsonl_with_one_bad_row([REPLAY_ROWS[i] for i in chosen]))
    with tempfile.TemporaryDirectory() as tmp:
        engine = load_or_refused(
            "data: replay rows", Path(tmp) / "replay.jsonl", raw, line, ReplayEngine.from_path, error=ReflectEvoError
        )
        if engine is REFUSED:
            return
        assert len(engine.rows) == len(chosen)
        for key in {key for key, _sample in engine.rows}:
            n = next(n for n in range(len(engine.rows) + 1) if (key, n) not in engine.rows)  # samples 0 .. n-1 stored
            if n:
                settings = GenerationSettings(n=n, temperature=0.7 if n > 1 else 0.0)
                outputs = engine.generate([GenerationRequest(key, [])], settings, stage="s")
                assert all(
                    isinstance(out.text, str) and out.finish_reason in ("eos", "stop", "length") for out in outputs
                )


# ---- raw reflection records (stage 02's raw.jsonl, read by curation) ---------------------------------
INSTRUCTION_KEYS = list(prompts.INSTRUCTIONS)


def raw_record(qid: str, outcomes: tuple[str, ...], task: str = "logiqa") -> dict:
    outputs = []
    for position, outcome in enumerate(outcomes):
        first = position == 0
        answer = "" if outcome == "parse_failure" else ("B" if outcome == "correct" else "C")
        outputs.append(
            {
                "trial": 1 if first else 2,
                "key": f"{task}/{qid}/t1" if first else f"{task}/{qid}/{INSTRUCTION_KEYS[0]}/{position}",
                "instruction": None if first else INSTRUCTION_KEYS[0],
                "sample": None if first else position,
                "reasoning": f"Thought: try {position}.\nAction: Finish[{answer}]",
                "scratchpad": f"Action: Finish[{answer}]\nObservation: x",
                "generated_answer": answer,
                "is_correct": outcome == "correct",
                "outcome": outcome,
                "feedback": "Answer is INCORRECT",
                "error": None,
                "reflections": [] if first else [f"Reflection {position}: check the premises."],
            }
        )
    return {"task": task, "id": qid, "question": f"Question {qid}?\nA. yes\nB. no", "answer": "b", "output": outputs}


RAW_RECORDS = [
    raw_record("q1", ("wrong", "correct", "wrong")),
    raw_record("q2", ("correct",)),
    raw_record("q3", ("parse_failure", "correct", "timeout"), task="math"),
    raw_record("q4", ("wrong", "correct", "correct")),
]


@fuzz(300)
@given(st.data())
def test_raw_records_load_or_fail_at_their_line(data):
    chosen = data.draw(st.lists(st.integers(0, len(RAW_RECORDS) - 1), min_size=2, max_size=4, unique=True))
    raw, line = data.draw(jsonl_with_one_bad_row([RAW_RECORDS[i] for i in chosen]))
    with tempfile.TemporaryDirectory() as tmp:
        records = load_or_refused("data: raw records", Path(tmp) / "raw.jsonl", raw, line, curation.read_records)
        if records is REFUSED:
            return
        assert len(records) == len(chosen)
        curation.build_d_plus(records)  # what reads them next must not trip over what was accepted
        curation.build_d_pm(records)


# ---- released ReflectEvo files (load_released) ------------------------------------------------------
RELEASED_FILES = {
    "example_D+.jsonl": "d_plus",
    "example_D+-.jsonl": "d_pm",
    "example_Dpref.jsonl": "d_pref",
    "example_Reflection_raw.jsonl": "raw",
}


@cache
def released_rows(name: str) -> tuple[dict, ...] | None:
    path = official_data_dir() / "examples" / name
    if not path.is_file():
        return None
    return tuple(row for _line, row in released.read_json_objects(path))[:4]


@fuzz(300)
@given(st.data())
def test_released_rows_load_or_fail_at_their_line(data):
    name = data.draw(st.sampled_from(sorted(RELEASED_FILES)))
    pool = released_rows(name)
    if pool is None:
        if REQUIRE_FULL:
            pytest.fail(f"released example file {name} not found (REFLECTEVO_REQUIRE_FULL_TESTS=1)")
        pytest.skip(f"released example file {name} not found in {official_data_dir() / 'examples'}")
    chosen = data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=2, max_size=3, unique=True))
    raw, line = data.draw(jsonl_with_one_bad_row([pool[i] for i in chosen]))
    kind = data.draw(st.sampled_from([None, RELEASED_FILES[name]]))
    with tempfile.TemporaryDirectory() as tmp:
        rows = load_or_refused(
            "data: released rows", Path(tmp) / name, raw, line, lambda path: released.load_released(path, kind=kind)
        )
        if rows is REFUSED:
            return
        assert len(rows) == len(chosen)
        if RELEASED_FILES[name] == "raw" and kind:
            curation.build_d_plus(rows)
            curation.build_d_pm(rows)


# ---- predictions for `reflectevo grade --predictions` -----------------------------------------------
@fuzz(100)
@given(st.data())
def test_prediction_rows_are_graded_or_refused_at_their_line(data):
    pool = official_rows("logiqa")
    chosen = data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=2, max_size=4, unique=True))
    items = [pool[i] for i in chosen]
    predictions = [
        {"id": str(n + 1), "output": f"Thought: x\nAction: Finish[{row['answer'].upper()}]"}
        for n, row in enumerate(items)
    ]
    raw, line = data.draw(jsonl_with_one_bad_row(predictions))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in items), encoding="utf-8")
        (folder / "preds.jsonl").write_bytes(raw)
        stderr, stdout = io.StringIO(), io.StringIO()
        with contextlib.chdir(folder), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            status = cli_main(
                [
                    "grade",
                    "logiqa",
                    "--data",
                    "items.jsonl",
                    "--predictions",
                    "preds.jsonl",
                    "--allow-missing",
                    "--grader",
                    "official",
                ]
            )
        count("cli: prediction rows", accepted=status == 0)
        assert status in (0, 2), stderr.getvalue()
        if status == 2:
            message = stderr.getvalue().removeprefix("error: ")
            if "ids not in" in message:  # an id that names no item: the message names the file and the id
                assert message.startswith("preds.jsonl: ids not in items.jsonl"), message
            else:
                assert_names_line(DataError(message.strip()), Path("preds.jsonl"), line)
        assert files_under(folder) == {"items.jsonl", "preds.jsonl"}


# ---- the totals ---------------------------------------------------------------------------------------
def test_zz_inputs_tried(capsys):
    """Print how many inputs each property tried (and how many were accepted) in this session."""
    if not TRIED:
        pytest.skip("no property ran in this session")
    width = max(len(name) for name in TRIED)
    lines = [f"{'property':{width}s}  tried  accepted  refused"]
    for name in sorted(TRIED):
        lines.append(
            f"{name:{width}s}  {TRIED[name]:5d}  {OUTCOMES[name, 'accepted']:8d}  {OUTCOMES[name, 'refused']:7d}"
        )
    lines.append(f"{'total':{width}s}  {sum(TRIED.values()):5d}")
    with capsys.disabled():
        print("\n\nfuzz inputs tried\n" + "\n".join(lines))
    assert all(TRIED[name] > 0 for name in TRIED)
