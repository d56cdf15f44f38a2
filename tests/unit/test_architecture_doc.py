"""docs/architecture.md lists the middlewares that really run, in the order they run.

The list is read from the document's "The request path" section and compared with the middleware stack
the app factory builds with the default settings: adding, removing or moving a middleware without
updating the drawing fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

from starlette.routing import Router

from mercato.config import AuthSettings, DatabaseSettings, Environment, Settings
from mercato.gateway.app import create_app

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def _documented() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## The request path", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\d+\. `(\w+)`", section, flags=re.MULTILINE)


def _running(tmp_path: Path) -> list[str]:
    settings = Settings(
        env=Environment.TEST,
        database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'doc.db'}"),
        auth=AuthSettings(secret="architecture-doc-test-secret-0123456789abcdef"),  # type: ignore[arg-type]
    )
    layer: object = create_app(settings, configure_logs=False).build_middleware_stack()
    names = []
    # Each middleware holds the next one as `app` (ours sometimes `_app`), down to the router.
    while not isinstance(layer, Router):
        inner = getattr(layer, "app", None) or getattr(layer, "_app", None)
        assert inner is not None, f"{type(layer).__name__} hides the next layer"
        names.append(type(layer).__name__)
        layer = inner
    return names


def test_the_documented_request_path_is_the_running_one(tmp_path: Path) -> None:
    documented = _documented()
    assert documented, "no numbered middleware list under 'The request path' in docs/architecture.md"
    assert documented == _running(tmp_path), (
        "docs/architecture.md's request path no longer matches gateway/app.py: update the drawing"
    )
