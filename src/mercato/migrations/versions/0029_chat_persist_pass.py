"""Chat: one server-side function for the persister's pass (ADR 0077), PostgreSQL only.

`chat_persist_pass` does in one statement what a pass's transaction did in five round trips
(BEGIN, the rooms' shared locks, the fences/heads/dedup read, the insert, COMMIT): it takes the
rooms' advisory locks shared in key order, then, in a statement of its own (PL/pgSQL takes a new
snapshot per statement under READ COMMITTED, so a fence the mover committed while we waited on its
lock is seen), skips fenced rooms, finds the (room, sender, client_msg_id) already stored, numbers
the new ones after each room's head in pass order and inserts them. Called alone it is its own
transaction. Rows: kind 0 a fenced room, 1 a message stored before, 2 a message inserted now.

Revision ID: 0029
Revises: 0025
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0029"
down_revision = "0025"
branch_labels = None
depends_on = None

FUNCTION = """
CREATE OR REPLACE FUNCTION chat_persist_pass(
    p_keys bigint[], p_rooms uuid[], p_senders varchar[], p_texts text[], p_ids varchar[],
    p_now timestamptz
) RETURNS TABLE (
    kind integer, room_id uuid, seq bigint, sender varchar, text text, client_msg_id varchar,
    sent_at timestamptz
)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock_shared(k)
    FROM (SELECT k FROM unnest(p_keys) AS k ORDER BY k) AS ordered;
    RETURN QUERY
    WITH drafts AS (
        SELECT d.room_id, d.sender, d.text, d.client_msg_id, d.ord
        FROM unnest(p_rooms, p_senders, p_texts, p_ids)
            WITH ORDINALITY AS d (room_id, sender, text, client_msg_id, ord)
    ),
    fenced AS (
        SELECT f.room_id FROM chat_shard_fences AS f WHERE f.room_id = ANY(p_rooms)
    ),
    live AS (
        SELECT d.* FROM drafts AS d WHERE NOT EXISTS (SELECT 1 FROM fenced AS f WHERE f.room_id = d.room_id)
    ),
    known AS (
        -- joined on the whole unique key (room, sender, client_msg_id): one index probe per draft,
        -- where filtering on room and id alone walks each room's messages
        SELECT m.room_id, m.seq, m.sender, m.text, m.client_msg_id, m.sent_at
        FROM (SELECT DISTINCT l.room_id, l.sender, l.client_msg_id FROM live AS l) AS w
        JOIN chat_messages AS m
          ON m.room_id = w.room_id AND m.sender = w.sender AND m.client_msg_id = w.client_msg_id
    ),
    firsts AS (
        SELECT DISTINCT ON (l.room_id, l.sender, l.client_msg_id) l.*
        FROM live AS l
        WHERE NOT EXISTS (
            SELECT 1 FROM known AS k
            WHERE k.room_id = l.room_id AND k.sender = l.sender AND k.client_msg_id = l.client_msg_id
        )
        ORDER BY l.room_id, l.sender, l.client_msg_id, l.ord
    ),
    heads AS (
        SELECT m.room_id, max(m.seq) AS head
        FROM chat_messages AS m
        WHERE m.room_id IN (SELECT f.room_id FROM firsts AS f)
        GROUP BY m.room_id
    ),
    numbered AS (
        SELECT f.room_id, f.sender, f.text, f.client_msg_id,
               COALESCE(h.head, 0) + row_number() OVER (PARTITION BY f.room_id ORDER BY f.ord) AS seq
        FROM firsts AS f LEFT JOIN heads AS h ON h.room_id = f.room_id
    ),
    inserted AS (
        INSERT INTO chat_messages (room_id, seq, sender, text, client_msg_id, sent_at)
        SELECT n.room_id, n.seq, n.sender, n.text, n.client_msg_id, p_now FROM numbered AS n
        RETURNING chat_messages.room_id, chat_messages.seq, chat_messages.sender, chat_messages.text,
                  chat_messages.client_msg_id, chat_messages.sent_at
    )
    SELECT 0, f.room_id, CAST(0 AS bigint), CAST(NULL AS varchar), CAST(NULL AS text),
           CAST(NULL AS varchar), CAST(NULL AS timestamptz)
    FROM fenced AS f
    UNION ALL
    SELECT 1, k.room_id, k.seq, k.sender, k.text, k.client_msg_id, k.sent_at FROM known AS k
    UNION ALL
    SELECT 2, i.room_id, i.seq, i.sender, i.text, i.client_msg_id, i.sent_at FROM inserted AS i;
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION IF EXISTS chat_persist_pass(bigint[], uuid[], varchar[], text[], varchar[], timestamptz)"
        )
