"""`on_connection`: registered statements on the driver connection inside a SQLAlchemy transaction."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import bindparam, insert, select
from sqlalchemy.exc import IntegrityError

from mercato.bootstrap import Container
from mercato.kit.messaging.tables import inbox
from mercato.kit.storage.statements import driver_prepared
from mercato.kit.storage.statements_in_tx import on_connection

_RECORD = driver_prepared(
    insert(inbox).values(
        consumer=bindparam("consumer", type_=inbox.c.consumer.type),
        message_id=bindparam("message_id", type_=inbox.c.message_id.type),
        processed_at=bindparam("processed_at", type_=inbox.c.processed_at.type),
    )
)


def _row(message_id: uuid.UUID) -> dict[str, object]:
    return {"consumer": "tx-test", "message_id": message_id, "processed_at": datetime.now(UTC)}


async def recorded(container: Container) -> set[uuid.UUID]:
    async with container.db.read() as conn:
        rows = await conn.execute(select(inbox.c.message_id).where(inbox.c.consumer == "tx-test"))
        return {uuid.UUID(str(r[0])) for r in rows}


async def test_driver_statements_commit_and_roll_back_with_the_sqlalchemy_transaction(
    container: Container,
) -> None:
    kept, dropped = uuid.uuid4(), uuid.uuid4()
    async with container.db.write() as conn:
        # The driver statement first: on asyncpg it begins the transaction SQLAlchemy then joins.
        await on_connection(conn).run(_RECORD, _row(kept))
        await conn.execute(insert(inbox).values(**_row(uuid.uuid4())))

    async def failing() -> None:
        async with container.db.write() as conn:
            await on_connection(conn).run(_RECORD, _row(dropped))
            raise RuntimeError("the caller's work failed")

    with pytest.raises(RuntimeError):
        await failing()
    found = await recorded(container)
    assert kept in found
    assert dropped not in found


async def test_a_driver_error_is_raised_as_sqlalchemy_raises_it_and_rolls_back(container: Container) -> None:
    first, other = uuid.uuid4(), uuid.uuid4()
    async with container.db.write() as conn:
        await on_connection(conn).run(_RECORD, _row(first))

    async def duplicate() -> None:
        async with container.db.write() as conn:
            await on_connection(conn).run(_RECORD, _row(other))
            await on_connection(conn).run(_RECORD, _row(first))  # the primary key again

    with pytest.raises(IntegrityError):
        await duplicate()
    assert other not in await recorded(container)
    # The connection went back to the pool usable.
    async with container.db.write() as conn:
        new = await on_connection(conn).insert_new(
            inbox, [_row(first), _row(other)], conflict=["consumer", "message_id"], key="message_id"
        )
    assert {uuid.UUID(str(m)) for m in new} == {other}
