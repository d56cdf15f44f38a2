"""Alembic migration scripts for every context's tables (run with `mercato migrate`)."""

from pathlib import Path

SCRIPT_LOCATION = Path(__file__).parent
