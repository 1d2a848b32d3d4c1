"""Documentation: every relative link resolves, anchors included; the README stays a map of the guides."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README_MAX_LINES = 250

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^()\s<>]*)>?(?:\s+\"[^\"]*\"|\s+'[^']*')?\s*\)")
_REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def documents() -> list[Path]:
    """The Markdown files whose links are checked."""
    return [
        REPO / "README.md",
        *sorted(DOCS.glob("*.md")),
        REPO / "params" / "README.md",
        REPO / "notebooks" / "README.md",
    ]


def _prose_lines(text: str, blank_code_spans: bool = True) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks (blank inside), inline code blanked out."""
    lines, fence = [], None
    for line in text.splitlines():
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
            lines.append("")
        elif fence is not None:
            closing = opened.group(1) if opened else ""
            if closing[:1] == fence[0] and len(closing) >= len(fence) and line.strip() == closing:
                fence = None
            lines.append("")
        elif blank_code_spans:
            lines.append(_CODE_SPAN.sub(lambda match: " " * len(match.group(0)), line))
        else:
            lines.append(line)
    return lines


def links(text: str) -> list[tuple[int, str]]:
    """(line number, link target) of every Markdown link and image of a text, code excluded."""
    found = []
    for number, line in enumerate(_prose_lines(text), start=1):
        found += [(number, match.group(1)) for match in _INLINE_LINK.finditer(line)]
        reference = _REFERENCE_LINK.match(line)
        if reference:
            found.append((number, reference.group(1)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower-case, punctuation dropped (except - and _), spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    kept = "".join(
        char
        for char in text
        if char in " -_" or unicodedata.category(char)[0] in "LMN" or unicodedata.category(char) == "Pc"
    )
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text, with GitHub's -1, -2, ... for repeated headings."""
    seen: dict[str, int] = {}
    result = set()
    for line in _prose_lines(text, blank_code_spans=False):
        heading = _HEADING.match(line)
        if not heading:
            continue
        base = slug(heading.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def resolve(document: Path, target: str, root: Path) -> tuple[Path | None, str]:
    """The path a relative link points at (None for an external link) and its anchor ('' if none)."""
    if _SCHEME.match(target):
        return None, ""
    path, _, anchor = target.partition("#")
    path = unquote(path)
    if not path:
        return document, anchor
    if path.startswith("/"):
        return (root / path.lstrip("/")).resolve(), anchor
    return (document.parent / path).resolve(), anchor


def link_problems(document: Path, root: Path = REPO) -> list[str]:
    """What is wrong with the relative links of one Markdown file, one line per broken link."""
    problems = []
    text = document.read_text(encoding="utf-8")
    for number, target in links(text):
        where = f"{document.relative_to(root)}:{number}: {target}"
        if not target:
            problems.append(f"{where}: empty link")
            continue
        path, anchor = resolve(document, target, root)
        if path is None:
            continue
        if not path.is_relative_to(root.resolve()):
            problems.append(f"{where}: points outside the repository")
        elif not path.exists():
            problems.append(f"{where}: no such file or folder")
        elif anchor and path.is_file() and path.suffix.lower() == ".md":
            if unquote(anchor).lower() not in anchors(path.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading with the anchor #{anchor} in {path.relative_to(root.resolve())}")
    return problems


def test_the_checked_documents_exist():
    assert DOCS.is_dir() and any(DOCS.glob("*.md"))
    for document in documents():
        assert document.is_file(), document


@pytest.mark.parametrize("document", documents(), ids=lambda path: str(path.relative_to(REPO)))
def test_relative_links_resolve(document):
    problems = link_problems(document)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_map():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_every_guide_is_linked_from_the_readme_or_the_docs_index():
    linked = set()
    for index in (REPO / "README.md", DOCS / "README.md"):
        for _, target in links(index.read_text(encoding="utf-8")):
            path, _ = resolve(index, target, REPO)
            if path is not None:
                linked.add(path)
    unlinked = [
        str(path.relative_to(REPO))
        for path in sorted(DOCS.rglob("*"))
        if path.is_file() and path.resolve() not in linked
    ]
    assert not unlinked, f"not linked from README.md or docs/README.md: {unlinked}"


def test_the_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "guide.md").write_text("# A guide\n\n## Part two: `x.y`\n\n## Part two: `x.y`\n", encoding="utf-8")
    (tmp_path / "folder").mkdir()
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](guide.md) [ok](guide.md#part-two-xy) [ok](guide.md#part-two-xy-1) [ok](folder/) [ok](#page)\n"
        "[web](https://example.org/x) [mail](mailto:someone@example.org) `[code](missing.md)`\n"
        "```\n[code](missing.md)\n```\n"
        "[missing](missing.md) [bad anchor](guide.md#part-three) [bad self](#nowhere) ![image](missing.png)\n",
        encoding="utf-8",
    )
    problems = link_problems(page, root=tmp_path)
    assert [problem.split(": ", 1)[1] for problem in problems] == [
        "missing.md: no such file or folder",
        "guide.md#part-three: no heading with the anchor #part-three in guide.md",
        "#nowhere: no heading with the anchor #nowhere in page.md",
        "missing.png: no such file or folder",
    ]
    assert all(problem.startswith("page.md:8:") for problem in problems)


@pytest.mark.parametrize(
    "heading, expected",
    [
        ("Several rounds: `evolve`", "several-rounds-evolve"),
        (
            "The Dpref judge's budget: `reflect.judge.max_new_tokens`",
            "the-dpref-judges-budget-reflectjudgemax_new_tokens",
        ),
        ("Acc@t1 / Acc@t2", "acct1--acct2"),
        ("D+, D± and Dpref", "d-d-and-dpref"),
    ],
)
def test_slugs_follow_github(heading, expected):
    assert slug(heading) == expected
