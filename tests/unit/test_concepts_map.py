"""docs/concepts.md cites only what exists: every backticked path in its table (under `src/mercato/`,
`tests/`, `docs/` or the repository's root; `<name>` and `{id}` stand for any one name) and every
`file.py::name` (a test, fixture, function or class defined in that file; `::name` alone is one more
in the file cited just before it in the same cell). A bare file name (`adapters.py`) is in the
folder of the path cited just before it in the same cell, or at the top of `src/mercato/`, `tests/`
or `docs/`. Every ADR the table names is written in `docs/decisions/`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONCEPTS = ROOT / "docs" / "concepts.md"
BASES = (ROOT / "src" / "mercato", ROOT / "tests", ROOT, ROOT / "docs")

# A backticked path: lower-case names, '/', '.', '*' and placeholders, then `::name`s.
_CITE = re.compile(r"(?P<path>(?:[a-z0-9_.*/\-]|<[^>]*>|\{[^}]*\})*)(?P<names>(?:::[^\s:`]+)*)")
_PLACEHOLDER = re.compile(r"<[^>]*>|\{[^}]*\}")


def _cells(line: str) -> list[str]:
    """A table line's cells: split at each `|` outside backticks (`restore --to-time T | --latest`)."""
    parts = re.split(r"(`[^`\n]*`)", line.strip().strip("|"))
    cells: list[str] = []
    cell = ""
    for part in parts:
        if part.startswith("`"):
            cell += part
            continue
        first, *rest = part.split("|")
        cell += first
        for piece in rest:
            cells.append(cell)
            cell = piece
    return [c.strip() for c in [*cells, cell]]


def _rows() -> list[tuple[str, list[str]]]:
    """(row number, cells) of every table row."""
    rows = []
    for line in CONCEPTS.read_text().splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|", line)
        if match:
            rows.append((match.group(1), _cells(line)))
    return rows


def _is_path(path: str) -> bool:
    if not path or path.startswith(("/", "../")):  # routes; what lies outside the repository
        return False
    return "/" in path or path.endswith((".py", ".md"))


def _matches(path: str, bases: tuple[Path, ...]) -> list[Path]:
    pattern = _PLACEHOLDER.sub("*", path).rstrip("/")
    return [hit for base in bases for hit in sorted(base.glob(pattern))]


def _defines(files: list[Path], name: str) -> bool:
    word = re.escape(name)
    defined = re.compile(rf"^\s*(?:async\s+def|def|class)\s+{word}\b|^{word}\s*[:=]", re.M)
    sources = [p for f in files for p in ([f] if f.is_file() else sorted(f.rglob("*.py")))]
    return any(defined.search(source.read_text()) for source in sources)


def _dangling(cell: str) -> list[str]:
    """What CELL cites that does not exist."""
    wrong: list[str] = []
    cited: list[Path] = []  # what the last path named
    tokens = re.findall(r"`([^`\n]+)`", cell)
    # A pytest command's files are cited paths too.
    tokens = [word for t in tokens for word in (t.split()[1:] if t.startswith("pytest ") else [t])]
    for token in tokens:
        match = _CITE.fullmatch(token)
        if match is None:
            continue
        path, names = match.group("path"), [n for n in match.group("names").split("::") if n]
        if path:
            if not _is_path(path):
                continue
            if "/" in path:
                hits = _matches(path, BASES)
            else:  # a bare file name: next to the path cited before it, or at the top of a base
                folders = tuple(dict.fromkeys(c if c.is_dir() else c.parent for c in cited))
                hits = _matches(path, folders) or _matches(path, BASES)
            if not hits:
                wrong.append(f"{token}: no such path")
                cited = []
                continue
            cited = hits
        elif not names:
            continue
        if names and not cited:
            wrong.append(f"{token}: no file cited before it")
            continue
        wrong += [f"{token}: {name} not defined there" for name in names if not _defines(cited, name)]
    return wrong


@pytest.mark.parametrize(("number", "cells"), _rows(), ids=[number for number, _ in _rows()])
def test_every_row_cites_paths_and_names_that_exist(number: str, cells: list[str]) -> None:
    dangling = [what for cell in cells for what in _dangling(cell)]
    assert dangling == [], f"row {number}: {dangling}"


def test_a_bar_inside_backticks_does_not_split_a_cell() -> None:
    assert _cells("| 1 | `a | b` and `c` | d |") == ["1", "`a | b` and `c`", "d"]


def test_the_table_is_read_whole() -> None:
    rows = _rows()
    assert len(rows) >= 40
    assert sorted(int(number) for number, _ in rows) == list(range(1, len(rows) + 1))
    assert all(len(cells) == 6 for _, cells in rows), [n for n, cells in rows if len(cells) != 6]


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("`kit/realtime` and `integration/test_sagas.py`", []),
        ("`kit/nowhere.py`", ["kit/nowhere.py: no such path"]),
        (
            "`integration/test_sagas.py::test_not_there`",
            ["integration/test_sagas.py::test_not_there: test_not_there not defined there"],
        ),
        ("`shop/checkout/resilient.py` + `adapters.py`", []),
        ("`shop/checkout/resilient.py` + `shards.py`", ["shards.py: no such path"]),
        ("`::test_alone`", ["::test_alone: no file cited before it"]),
        ("`GET /v1/orders` `/readyz` `LISTEN/NOTIFY` `../shared/guide.md`", []),
        ("`migrations/versions/<n>_x.py`", ["migrations/versions/<n>_x.py: no such path"]),
        ("`golden/events/<type>/v<N>/`", []),
        ("`pytest tests/unit/test_nothing.py -s`", ["tests/unit/test_nothing.py: no such path"]),
    ],
)
def test_the_check_itself_tells_a_dangling_citation(cell: str, expected: list[str]) -> None:
    assert _dangling(cell) == expected


def test_every_adr_the_table_names_is_in_docs_decisions() -> None:
    text = CONCEPTS.read_text()
    named = {n for run in re.findall(r"\bADRs?\s+([\d,/–\- and]+)", text) for n in re.findall(r"\d{4}", run)}
    written = {path.name[:4] for path in (ROOT / "docs" / "decisions").glob("[0-9][0-9][0-9][0-9]-*.md")}
    assert len(named) >= 50
    assert sorted(named - written) == []
