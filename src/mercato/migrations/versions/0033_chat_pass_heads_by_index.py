"""Chat: the persist pass reads each room's head from the index, not from the room's rows (ADR 0091).

Migration 0029's `chat_persist_pass` found the heads with `max(seq) ... GROUP BY room_id`.
PostgreSQL's min/max rewrite (one backward index probe) applies only to an aggregate without a
GROUP BY, so that read visited every message of every room in the pass: a pass of 15 rooms with
~200 messages each read 3,166 rows (2,916 buffers, ~2.9 ms of the function's ~3.4 ms), and a pass's
cost grew with its rooms' history. Here the head is one correlated `max(seq)` per room, which the
rewrite turns into a probe of the primary key (room_id, seq) from its end: constant per room.
MATERIALIZED: inlined, the join below re-ran the probes once per draft (120 for 15 drafts).

The function is 0029's with that one CTE replaced; the downgrade puts 0029's back.

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-07
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import op

revision = "0033"
down_revision = "0032"
branch_labels = None
depends_on = None

_GROUPED_HEADS = """    heads AS (
        SELECT m.room_id, max(m.seq) AS head
        FROM chat_messages AS m
        WHERE m.room_id IN (SELECT f.room_id FROM firsts AS f)
        GROUP BY m.room_id
    ),"""

_INDEXED_HEADS = """    heads AS MATERIALIZED (
        SELECT r.room_id, (SELECT max(m.seq) FROM chat_messages AS m WHERE m.room_id = r.room_id) AS head
        FROM (SELECT DISTINCT f.room_id FROM firsts AS f) AS r
    ),"""


def _migration_0029() -> ModuleType:
    # Revision files are not a package: loaded by path, as alembic loads them.
    path = Path(__file__).with_name("0029_chat_persist_pass.py")
    spec = importlib.util.spec_from_file_location("mercato_migration_0029", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def function_with_indexed_heads() -> str:
    original = str(_migration_0029().FUNCTION)
    if _GROUPED_HEADS not in original:
        raise RuntimeError("migration 0029's heads CTE changed: update migration 0033")
    return original.replace(_GROUPED_HEADS, _INDEXED_HEADS)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(function_with_indexed_heads())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(str(_migration_0029().FUNCTION))
