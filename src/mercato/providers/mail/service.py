"""The mailbox: accepted messages on the provider's own tables, deduplicated on `Message-ID`.

A sender that lost our answer (a dropped connection after `DATA`) cannot know whether the message
was stored, so it sends again with the same `Message-ID`; storing it once and answering the retry
`250` like the first is what makes "at least once" from the sender "exactly once" in the mailbox.
"""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Column, Index, String, Table, Text, bindparam, select
from sqlalchemy.dialects import postgresql

from mercato.kit.clock import Clock
from mercato.kit.ids import new_id
from mercato.kit.storage import UTCDateTime
from mercato.kit.storage.inline_sqlite import SqlDatabase
from mercato.kit.storage.statements import driver_prepared
from mercato.kit.web.pagination import Cursor, CursorError
from mercato.providers._edge import ProviderProblem
from mercato.providers._storage import create_tables, new_metadata, row_insert
from mercato.providers.mail.models import MailOut, MailPage

__all__ = ["Accepted", "Mailbox", "mail_metadata"]

mail_metadata = new_metadata()

messages = Table(
    "mail_messages",
    mail_metadata,
    Column("id", String(36), primary_key=True),
    Column("message_id", String(998), nullable=False, unique=True),
    Column("mail_from", String(320), nullable=False),
    Column("recipients", Text, nullable=False),
    Column("subject", String(998), nullable=False),
    Column("body", Text, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
)

# One row per (message, recipient), so `GET /messages?recipient=` is an index range, not a scan.
recipients = Table(
    "mail_recipients",
    mail_metadata,
    Column("message", String(36), primary_key=True),
    Column("address", String(320), primary_key=True),
    Index("ix_mail_recipients_address_message", "address", "message"),
)


# Both engines spell INSERT ... ON CONFLICT DO NOTHING RETURNING alike.
_STORE = driver_prepared(
    postgresql.insert(messages)
    .values({c.name: bindparam(c.name, type_=c.type) for c in messages.c})
    .on_conflict_do_nothing(index_elements=[messages.c.message_id])
    .returning(messages.c.id)
)
_RECIPIENT = row_insert(recipients)


@dataclass(frozen=True, slots=True)
class Accepted:
    id: str
    duplicate: bool


def _out(row: Any) -> MailOut:
    return MailOut(
        id=row["id"],
        message_id=row["message_id"],
        mail_from=row["mail_from"],
        recipients=list(orjson.loads(row["recipients"])),
        subject=row["subject"],
        body=row["body"],
        received_at=row["received_at"],
    )


def _parse(raw: bytes) -> tuple[str | None, str, str]:
    """`(Message-ID, Subject, text body)` of a raw RFC 5322 message.

    The `email` package's modern policy builds a header object for every header it is asked for
    (~1–3 ms per message on this VM: most of the mail simulator's CPU per checkout, ADR 0071). A
    message whose headers need none of that — one text/plain part, ASCII headers with no encoded
    words, no folded lines, no disposition — reads the same through the legacy parser; anything else
    goes through the full one."""
    simple = _parse_simple(raw)
    return simple if simple is not None else _parse_full(raw)


_SIMPLE_TRANSFER_ENCODINGS = frozenset({"", "7bit", "8bit", "quoted-printable", "base64"})


def _parse_simple(raw: bytes) -> tuple[str | None, str, str] | None:
    ends = [end for end in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if end >= 0]
    head = raw[: min(ends)] if ends else raw
    if b"=?" in head or not head.isascii() or b"\n " in head or b"\n\t" in head:
        return None  # encoded words, 8-bit or folded headers: the full parser decodes them
    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    if parsed.is_multipart() or parsed.get_content_type() != "text/plain":
        return None
    if "Content-Disposition" in parsed or parsed.defects:
        return None
    encoding = str(parsed.get("Content-Transfer-Encoding", "")).strip().lower()
    if encoding not in _SIMPLE_TRANSFER_ENCODINGS:
        return None
    values = [parsed.get(name) for name in ("Message-ID", "Subject")]
    if any(v is not None and (not isinstance(v, str) or v != v.strip()) for v in values):
        return None
    message_id, subject = values
    payload = parsed.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return None
    try:
        body = payload.decode(str(parsed.get_param("charset", "ASCII")), errors="replace")
    except LookupError:
        return None
    return (message_id or None), (subject or ""), body.replace("\r\n", "\n")


def _parse_full(raw: bytes) -> tuple[str | None, str, str]:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    message_id = parsed.get("Message-ID")
    subject = str(parsed.get("Subject", ""))
    body = ""
    part = parsed.get_body(preferencelist=("plain",))  # type: ignore[attr-defined]
    if part is not None:
        body = str(part.get_content()).replace("\r\n", "\n")
    return (str(message_id).strip() if message_id else None), subject, body


class Mailbox:
    def __init__(self, db: SqlDatabase, *, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    async def start(self) -> None:
        await create_tables(self.db, mail_metadata)

    async def close(self) -> None:
        await self.db.dispose()

    async def accept(self, *, mail_from: str, rcpt_tos: list[str], raw: bytes) -> Accepted:
        """Store the message unless one with its `Message-ID` is already here (then: a duplicate).

        A message without a `Message-ID` gets one of ours and is never a duplicate.
        """
        message_id, subject, body = _parse(raw)
        pk = str(new_id())
        message_id = message_id or f"<{pk}@mail.mercato.local>"
        addresses = sorted({address.strip().lower() for address in rcpt_tos})
        row = {
            "id": pk,
            "message_id": message_id,
            "mail_from": mail_from,
            "recipients": orjson.dumps(addresses).decode(),
            "subject": subject[:998],
            "body": body,
            "received_at": self.clock.now(),
        }
        async with self.db.write() as conn:
            # One statement stores a new message or finds it there (its `Message-ID` taken: a
            # retried send), where a look-up then an insert took two; a concurrent copy waits on
            # the first one's row and then finds it taken too.
            stored = (await conn.execute(_STORE, row)).scalar()
            if stored is None:
                existing = (
                    await conn.execute(select(messages.c.id).where(messages.c.message_id == message_id))
                ).scalar()
                return Accepted(id=str(existing), duplicate=True)
            rows = [{"message": pk, "address": address} for address in addresses]
            # One recipient (the usual mail) as one row: the registered statement's fast path.
            await conn.execute(_RECIPIENT, rows[0] if len(rows) == 1 else rows)
            return Accepted(id=pk, duplicate=False)

    async def page(self, *, recipient: str | None, limit: int, cursor: str | None) -> MailPage:
        """Oldest first, keyset by id (UUIDv7); `recipient` narrows to one envelope recipient."""
        query = select(messages).order_by(messages.c.id).limit(limit + 1)
        if recipient is not None:
            query = query.where(
                messages.c.id.in_(
                    select(recipients.c.message).where(recipients.c.address == recipient.strip().lower())
                )
            )
        if cursor:
            try:
                after = Cursor.decode(cursor, expected_sort="id").id
            except CursorError as exc:
                raise ProviderProblem(400, "invalid-cursor", "Invalid cursor", str(exc)) from exc
            query = query.where(messages.c.id > after)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).mappings().all()
        items = [_out(row) for row in rows[:limit]]
        next_cursor = Cursor(sort="id", value=None, id=items[-1].id).encode() if len(rows) > limit else None
        return MailPage(items=items, next_cursor=next_cursor)
