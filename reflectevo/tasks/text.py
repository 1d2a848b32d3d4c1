"""Text rules shared by the ``Finish[...]`` tasks: option parsing, option-letter reading, SQuAD scoring."""

from __future__ import annotations

import re
import string
from collections import Counter

LETTERS = string.ascii_uppercase

# An option line in the official files: "A.text", "A. text", and a few typos the LogiQA file has ("A?").
_OPTION_LINE = re.compile(r"^([A-Z])[.?]\s?(.*)$")


def parse_options(question: str, expected: int | None = None) -> list[str]:
    """Option texts listed one per line as ``A. ...``, ``B. ...`` at the end of a question.

    Returns [] unless the letters run A, B, C, ... without a gap (and, when ``expected`` is
    given, there are exactly that many): a malformed block is better reported as "no options"
    than guessed.
    """
    found: list[tuple[str, str]] = []
    for line in question.splitlines():
        match = _OPTION_LINE.match(line.strip())
        if match:
            found.append((match.group(1), match.group(2).strip()))
    # keep the last run that starts at "A": passages can contain lines like "A. Smith said ..."
    start = max((i for i, (letter, _) in enumerate(found) if letter == "A"), default=None)
    if start is None:
        return []
    run = found[start:]
    if [letter for letter, _ in run] != list(LETTERS[: len(run)]):
        return []
    if expected is not None and len(run) != expected:
        return []
    return [text for _, text in run]


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

    Returns ``(letter, method)`` with an upper-case letter among the first ``n_options``, or
    ``(None, reason)``. A bare word that merely starts with a letter ("A and B", "apple") is not
    read as a letter.
    """
    cleaned = answer.strip().strip("\"'`*").strip()
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
        return None, f"letter {match.group(1).upper()} is not one of the options {valid[0]}-{valid[-1]}"
    return None, "no option letter or option text found"


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
