"""The one output harness of every `mercato lab` experiment and `mercato bench` benchmark.

A run writes into its own **run folder**, never over a committed file: by default
``./lab-results/<name>/<UTC timestamp>/`` (``lab-results/`` is git-ignored, so a fresh clone stays
clean after any lab or bench), or the folder given with ``--out DIR``. What a run folder holds:

- ``report.json``: the run's figures, the same data ``--json`` prints;
- ``table.txt``: the table(s) as printed, plain text;
- ``verdict.txt``: the run's conclusions, one line each (a lab's hypothesis verdict);
- ``<name>.png``: the figure, for the experiments that draw one;
- ``result.json``: the machine-readable summary every run ends with (name, finished time, ``held``:
  true / false / null when the run judges no claim, the verdict lines, the figure's file name), which
  ``mercato lab list`` and the console's Lab page read (`latest_result`).

Refreshing a committed figure (``docs/lab/<name>.png``, cited by docs/concepts.md and
docs/benchmarks.md) is an explicit ``--update-docs``: the run's PNG is copied there after the run.
It is checked before the run starts, so a long run is not wasted on a working directory that is
not the repository's root.

It lives in `mercato.bench` because the layer contract puts the bench below the lab (the lab
drives the bench's generator); both import it from here.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, RenderableType

__all__ = [
    "DOCS_FIGURES",
    "RESULTS_ROOT",
    "RESULT_FILE",
    "OutOption",
    "RunFolder",
    "UpdateDocsOption",
    "check_docs_target",
    "judge",
    "latest_result",
    "run_stamp",
]

RESULTS_ROOT = Path("lab-results")
RESULT_FILE = "result.json"
# Words verdict lines use when a run did not bear its claim out, and when it did.
_FAILED = re.compile(r"DID NOT HOLD|did not hold|VIOLATED|\bFAIL\b|: NO\b")
_HELD = re.compile(r"\bHELD\b|\bheld\b|\bholds\b|\bPASS\b")
DOCS_FIGURES = Path("docs/lab")

OutOption = Annotated[
    Path | None,
    typer.Option(
        "--out",
        file_okay=False,
        help="Run folder for the table, JSON, verdict and figure (default: ./lab-results/<name>/<UTC time>/)",
    ),
]
UpdateDocsOption = Annotated[
    bool,
    typer.Option(
        "--update-docs",
        help="Also copy the figure over the committed one in docs/lab/ (run from the repository's root)",
    ),
]


def run_stamp(now: dt.datetime | None = None) -> str:
    """A run folder's name: the UTC start time, sortable (``20261206T010203Z``)."""
    moment = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return moment.strftime("%Y%m%dT%H%M%SZ")


def check_docs_target(name: str, *, docs_dir: Path = DOCS_FIGURES) -> Path:
    """The committed figure ``--update-docs`` would replace; a usage error when ``docs_dir`` is not
    here (the command is not run from the repository's root), before any measuring starts."""
    if not docs_dir.is_dir():
        raise typer.BadParameter(
            f"--update-docs writes {docs_dir / f'{name}.png'}, but {docs_dir}/ is not here: "
            "run it from the repository's root",
            param_hint="--update-docs",
        )
    return docs_dir / f"{name}.png"


@dataclass(frozen=True)
class RunFolder:
    """Where one run's outputs go (see the module docstring for what it holds)."""

    name: str
    path: Path

    @classmethod
    def open(
        cls, name: str, out: Path | None = None, *, root: Path = RESULTS_ROOT, now: dt.datetime | None = None
    ) -> RunFolder:
        """``out`` as given, or a new ``<root>/<name>/<UTC time>/`` (suffixed if that run exists)."""
        if out is None:
            base = root / name / run_stamp(now)
            out, n = base, 1
            while out.exists():
                n += 1
                out = base.with_name(f"{base.name}-{n}")
        out.mkdir(parents=True, exist_ok=True)
        return cls(name, out)

    def file(self, filename: str) -> Path:
        return self.path / filename

    @property
    def figure(self) -> Path:
        """The run's PNG, for the experiments that draw one."""
        return self.path / f"{self.name}.png"

    def write_json(self, data: Any, filename: str = "report.json") -> Path:
        path = self.file(filename)
        path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        return path

    def write_table(self, *renderables: RenderableType, filename: str = "table.txt") -> Path:
        """The tables as the terminal shows them, without colour codes."""
        buffer = io.StringIO()
        console = Console(file=buffer, width=200, color_system=None, force_terminal=False, soft_wrap=False)
        for renderable in renderables:
            console.print(renderable)
        path = self.file(filename)
        path.write_text(buffer.getvalue(), encoding="utf-8")
        return path

    def write_verdict(self, lines: Iterable[str], filename: str = "verdict.txt") -> Path:
        path = self.file(filename)
        path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        return path

    def publish_figure(self, *, docs_dir: Path = DOCS_FIGURES) -> Path:
        """Copy the run's figure over the committed one (``--update-docs``)."""
        target = check_docs_target(self.name, docs_dir=docs_dir)
        if not self.figure.is_file():
            raise FileNotFoundError(f"{self.figure} was not written")
        shutil.copyfile(self.figure, target)
        return target

    def write_result(
        self, *, held: bool | None = None, verdict: Sequence[str] = (), now: dt.datetime | None = None
    ) -> Path:
        """``result.json``: the run's summary; ``held`` judged from the verdict lines when not given."""
        summary = {
            "name": self.name,
            "run": self.path.name,
            "finished_at": (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat(),
            "held": judge(verdict) if held is None else held,
            "verdict": list(verdict),
            "figure": self.figure.name if self.figure.is_file() else None,
        }
        return self.write_json(summary, RESULT_FILE)

    def record(
        self,
        *,
        data: Any,
        tables: Sequence[RenderableType] = (),
        verdict: Iterable[str] = (),
        update_docs: bool = False,
        console: Console | None = None,
        held: bool | None = None,
    ) -> list[Path]:
        """Write a finished run's outputs (the figure, if any, is already in the folder), refresh the
        committed figure when asked, and say where everything went on ``console`` (stderr)."""
        written = [self.write_json(data)]
        if tables:
            written.append(self.write_table(*tables))
        lines = list(verdict)
        if lines:
            written.append(self.write_verdict(lines))
        if self.figure.is_file():
            written.append(self.figure)
        written.append(self.write_result(held=held, verdict=lines))
        if console is not None:
            names = ", ".join(path.name for path in written)
            console.print(f"run folder: {self.path} ({names})")
        if update_docs:
            published = self.publish_figure()
            written.append(published)
            if console is not None:
                console.print(f"updated the committed figure {published}")
        return written


def judge(verdict: Iterable[str]) -> bool | None:
    """Whether verdict lines say the claim held: False if any says it did not (DID NOT HOLD,
    VIOLATED, FAIL, NO), True if one says it held (HELD, holds, PASS), None when none judges."""
    lines = list(verdict)
    if any(_FAILED.search(line) for line in lines):
        return False
    if any(_HELD.search(line) for line in lines):
        return True
    return None


def latest_result(name: str, *, root: Path = RESULTS_ROOT) -> dict[str, Any] | None:
    """The newest run of `name` under ``root`` (run folders sort by their UTC stamp) that finished:
    its ``result.json``, or for a run written before that file existed, one built from its
    ``verdict.txt``. None when `name` never finished a run here."""
    folder = root / name
    if not folder.is_dir():
        return None
    for run in sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True):
        result = run / RESULT_FILE
        if result.is_file():
            try:
                loaded = json.loads(result.read_text(encoding="utf-8"))
            except ValueError:
                continue
            if isinstance(loaded, dict):
                return {**loaded, "path": str(run.resolve())}
        verdict = run / "verdict.txt"
        if verdict.is_file():
            lines = verdict.read_text(encoding="utf-8").splitlines()
            figure = run / f"{name}.png"
            return {
                "name": name,
                "run": run.name,
                "finished_at": None,
                "held": judge(lines),
                "verdict": lines,
                "figure": figure.name if figure.is_file() else None,
                "path": str(run.resolve()),
            }
    return None
