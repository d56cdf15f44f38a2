"""HTTP edge helpers shared by every context's routes: problems, cursors, bearer auth."""

from mercato.kit.web.pagination import (
    CURSOR_MAX_LENGTH,
    CURSOR_PATTERN,
    Cursor,
    CursorError,
    InvalidCursor,
    Page,
)
from mercato.kit.web.problems import PROBLEM_MEDIA_TYPE, ProblemDetails, problem_responses
from mercato.kit.web.security import authenticated, require_scopes

__all__ = [
    "CURSOR_MAX_LENGTH",
    "CURSOR_PATTERN",
    "PROBLEM_MEDIA_TYPE",
    "Cursor",
    "CursorError",
    "InvalidCursor",
    "Page",
    "ProblemDetails",
    "authenticated",
    "problem_responses",
    "require_scopes",
]
