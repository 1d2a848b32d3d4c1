"""Generic text for the stand-in corpus: standard-library docstrings and random questions."""

from __future__ import annotations

import importlib
import inspect
import random
import re
from functools import lru_cache

from reflectevo.models.builtin.settings import TinySettings
from reflectevo.tasks import Item, get_task

# Stdlib modules whose docstrings widen the tokenizer's vocabulary and feed the generic examples:
# available offline on every CPython (they differ between Python versions; the hash sees that).
DOCSTRING_MODULES = (
    "json",
    "re",
    "collections",
    "argparse",
    "random",
    "string",
    "textwrap",
    "functools",
    "itertools",
    "statistics",
    "fractions",
    "decimal",
    "datetime",
    "calendar",
    "pathlib",
    "logging",
    "unittest",
    "difflib",
    "csv",
    "heapq",
    "bisect",
    "shutil",
    "zipfile",
    "os",
)

# How the generic examples divide between the answer layouts (multiple choice is the most varied).
GENERIC_SHARES = {"choice": 0.6, "math": 0.15, "free": 0.15, "code": 0.1}


def _task(name: str):
    return get_task(name)


# ---- generic format-only examples: random text, so the format holds on unseen questions ----------
@lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[str, ...]:
    """Docstrings of a fixed list of stdlib modules (offline on every CPython), de-duplicated."""
    docs: list[str] = []
    for module_name in DOCSTRING_MODULES:
        module = importlib.import_module(module_name)
        members = [obj for name, obj in sorted(vars(module).items()) if not name.startswith("_")]
        for obj in [module, *members]:
            if obj is module or inspect.isfunction(obj) or inspect.isclass(obj):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 40:
                    docs.append(doc)
    return tuple(dict.fromkeys(docs))


@lru_cache(maxsize=1)
def _sentences_and_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    sentences = []
    for doc in stdlib_docstrings():
        for sentence in re.split(r"(?<=[.?!])\s+", doc):
            sentence = " ".join(sentence.split())
            if 4 <= len(sentence.split()) <= 25 and not any(ch in sentence for ch in "[]<>{}"):
                sentences.append(sentence)
    words = {w.strip(".,:;()`'\"") for s in sentences for w in s.split()}
    return tuple(sentences), tuple(sorted(w for w in words if w.isalpha() and len(w) > 2))


def _generic_count(settings: TinySettings, layout: str) -> int:
    return round(settings.generic_examples * GENERIC_SHARES[layout])


def random_choice_item(rng: random.Random, item_id: str):
    """(task, item): a multiple-choice question on random docstring text, in the LogiQA layout
    (``A.text`` lines, 4 options) or the BIG-bench one (``Options:``, 2-4 options). Its gold is "a";
    the generic examples pick their own letter."""

    sentences, words = _sentences_and_words()
    task = _task(rng.choice(["logiqa", "bigbench"]))
    n_options = 4 if task.name == "logiqa" else rng.randint(2, 4)
    options = [" ".join(rng.sample(words, rng.randint(1, 3))).capitalize() for _ in range(n_options)]
    letters = [chr(ord("A") + i) for i in range(n_options)]
    if task.name == "logiqa":
        body = "\n".join(f"{letter}.{text}" for letter, text in zip(letters, options))
        question = f"{rng.choice(sentences)}\nWhich of the following is supported?\n{body}"
    else:
        body = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, options))
        question = f"{rng.choice(sentences)}\n\nQuestion: {rng.choice(sentences)}\nOptions:\n{body}"
    return task, Item(task=task.name, id=item_id, question=question, gold="a", options=options)
