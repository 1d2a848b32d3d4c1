"""Text rules shared by the ``Finish[...]`` tasks: option parsing, option-letter reading, SQuAD scoring."""

from __future__ import annotations

import re
import string
from collections import Counter

from reflectevo.tasks.base import Extraction

LETTERS = string.ascii_uppercase

# An option line in the official files: "A.text", "A. text", and a few typos the LogiQA file has ("A?").
_OPTION_LINE = re.compile(r"^([A-Z])[.?]\s?(.*)$")


def parse_options(question: str, expected: int | None = None) -> list[str]:
    """Option texts listed one per line as ``A. ...``, ``B. ...`` at the end of a question, in letter order.

    The block is the last run of option lines that starts at ``A``; its letters must be A, B, C, ...
    each once, in any order (17 official LogiQA questions list theirs as A, C, B, D; each text goes
    to the letter written before it, which is the letter the model sees). Returns [] for anything
    else, and when ``expected`` is given and the count differs: a malformed block is better
    reported as "no options" than guessed. :func:`options_problem` says why.
    """
    return _read_options(question, expected)[0]


def options_problem(question: str, expected: int | None = None) -> str | None:
    """Why :func:`parse_options` finds no options in ``question``; None when it finds them.

    Four official LogiQA questions have such a block: an option written ``A text`` without the
    dot (rows 46, 441, 451) or options run into the passage (row 113).
    """
    return _read_options(question, expected)[1]


def _read_options(question: str, expected: int | None) -> tuple[list[str], str | None]:
    found: list[tuple[str, str]] = []
    for line in question.splitlines():
        match = _OPTION_LINE.match(line.strip())
        if match:
            found.append((match.group(1), match.group(2).strip()))
    if not found:
        return [], "no option lines of the form 'A. text'"
    # keep the last run that starts at "A": passages can contain lines like "A. Smith said ..."
    start = max((i for i, (letter, _) in enumerate(found) if letter == "A"), default=None)
    letters = ", ".join(letter for letter, _ in found)
    if start is None:
        return [], f"no option line for A (option lines: {letters})"
    run = found[start:]
    written = [letter for letter, _ in run]
    if sorted(written) != list(LETTERS[: len(run)]):
        return [], f"option letters {', '.join(written)} after the last A are not A-{LETTERS[len(run) - 1]} each once"
    if expected is not None and len(run) != expected:
        return [], f"{len(run)} options, expected {expected}"
    return [text for _, text in sorted(run)], None


def finish_argument_balanced(text: str) -> str | None:
    """The argument of the first ``Finish[...]``, matching nested brackets (robust reading).

    ``Finish[the [red] car]`` gives ``the [red] car`` where the official rule stops at the first
    ``]``. With no closing bracket the rest of the text is returned, as the official rule does.
    """
    start = text.find("Finish[")
    if start < 0:
        return None
    depth, begin = 1, start + len("Finish[")
    for position in range(begin, len(text)):
        char = text[position]
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth == 0:
                return text[begin:position]
    return text[begin:]


_LETTER_ANSWER = re.compile(
    r"""^(?:(?:the\s+)?(?:option|answer|choice)\s*(?:is)?\s*[:\-]?\s*)?  # optional "Option", "Answer:"
        [\(\[]?([A-Za-z])[\)\]]?                                         # the letter, maybe bracketed
        (?:\s*[.:)\-]\s*.*)?$                                            # then "." / ":" and any text
    """,
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)


def read_option_letter(answer: str, options: list[str], n_options: int) -> tuple[str | None, str]:
    """Tolerant option reading: "(B)", "B.", "B. text", "Option B", "b", or the option's text.

    Returns ``(letter, method)`` with an upper-case letter among the first ``n_options`` (method
    "letter" or "option_text"), or ``(None, reason)``. A letter outside the options ("E" of four)
    comes back as ``(None, "letter E is not one of the options A-D")``; :func:`read_option_extraction`
    grades it as a wrong answer. A bare word that merely starts with a letter ("A and B", "apple")
    is not read as a letter.
    """
    cleaned = _clean_answer(answer)
    valid = LETTERS[:n_options]
    match = _LETTER_ANSWER.match(cleaned)
    if match and match.group(1).upper() in valid:
        return match.group(1).upper(), "letter"
    # an option's own text; this also covers options that are themselves letters ("G", "M")
    wanted = squad_normalize(cleaned) or cleaned.lower()
    hits = [LETTERS[i] for i, option in enumerate(options) if (squad_normalize(option) or option.lower()) == wanted]
    if len(hits) == 1:
        return hits[0], "option_text"
    if match:
        return None, f"letter {match.group(1).upper()} is not one of the options {_span(valid)}"
    return None, "no option letter or option text found"


def _span(letters: str) -> str:
    return f"{letters[0]}-{letters[-1]}" if letters else "(none)"


def read_option_extraction(argument: str, options: list[str], n_options: int) -> Extraction:
    """The robust reading of a multiple-choice ``Finish[...]`` argument.

    A letter the model clearly gave that is not one of the options (``Finish[E]`` on four) is its
    answer, only a wrong one: it is extracted (method ``letter_not_an_option``) and judged wrong,
    as the official grader judges it, so parse-failure rates compare across the graders.
    """
    letter, how = read_option_letter(argument, options, n_options)
    if letter is not None:
        return Extraction(letter, how)
    match = _LETTER_ANSWER.match(_clean_answer(argument))
    if match:
        return Extraction(match.group(1).upper(), "letter_not_an_option", how)
    return Extraction(None, "none", how)


def _clean_answer(answer: str) -> str:
    return answer.strip().strip("\"'`*").strip()


def squad_normalize(text: str) -> str:
    """SQuAD answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(char for char in text if char not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token-level F1 between normalised prediction and gold."""
    predicted = squad_normalize(prediction).split()
    expected = squad_normalize(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)
