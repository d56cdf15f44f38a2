"""No Python file of the repository passes 600 lines: `src/` (the benches and labs included) and
`tests/` alike. A file that grows past it is split where its parts separate (`bootstrap/` is one)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 600


def _sources() -> list[Path]:
    return sorted(p for top in ("src", "tests") for p in (ROOT / top).rglob("*.py"))


def test_no_python_file_passes_600_lines() -> None:
    sources = _sources()
    assert any(p.is_relative_to(ROOT / "tests") for p in sources)
    assert any(p.is_relative_to(ROOT / "src" / "mercato" / "bench") for p in sources)
    too_long = {
        str(p.relative_to(ROOT)): n
        for p in sources
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert too_long == {}
