"""`mercato dlq list|show|replay` driven through typer against a real, migrated SQLite database."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mercato.bootstrap import SCRIPT_LOCATION
from mercato.cli.main import app
from mercato.config import get_settings
from mercato.kit.messaging import DeadLetter, DeadLetterStatus, SqlLogStream
from mercato.kit.storage import create_database
from mercato.kit.storage.migrations import upgrade
from tests.integration.test_stream_contract import TOPIC, make_message

runner = CliRunner()


@pytest.fixture
def db_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite+aiosqlite:///{tmp_path}/dlq.db"
    upgrade(SCRIPT_LOCATION, url)
    monkeypatch.setenv("MERCATO_DATABASE_URL", url)
    monkeypatch.setenv("MERCATO_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


async def _kill(url: str, *, topic: str, group: str, count: int) -> None:
    """Publish `count` messages and fail each once with max_attempts=1: straight to the DLQ."""
    db = create_database(url)
    try:
        stream = SqlLogStream(db, partitions=1, max_attempts=1)
        await stream.publish([make_message(f"order-{n}", n, topic=topic) for n in range(count)])
        while batch := await stream.read(topic, group, "c1", max_messages=10, block_s=0):
            for delivery in batch:
                await stream.nack(delivery, error=f"KeyError: 'sku' in #{delivery.message.data['n']}")
    finally:
        await db.dispose()


async def _letters(url: str) -> list[DeadLetter]:
    db = create_database(url)
    try:
        return await SqlLogStream(db).dead_letters()
    finally:
        await db.dispose()


def test_list_show_and_replay_one(db_url: str) -> None:
    asyncio.run(_kill(db_url, topic=TOPIC, group="billing", count=2))
    asyncio.run(_kill(db_url, topic="mercato.payments", group="ledger", count=1))

    listed = runner.invoke(app, ["dlq", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    items = json.loads(listed.stdout)["items"]
    assert [(i["topic"], i["group"], i["status"]) for i in items] == [
        (TOPIC, "billing", "dead"),
        (TOPIC, "billing", "dead"),
        ("mercato.payments", "ledger", "dead"),
    ]
    only_payments = json.loads(
        runner.invoke(app, ["dlq", "list", "--topic", "mercato.payments", "--json"]).stdout
    )
    assert len(only_payments["items"]) == 1
    table = runner.invoke(app, ["dlq", "list"])
    assert table.exit_code == 0
    assert "billing" in table.stdout

    first = items[0]["id"]
    shown = runner.invoke(app, ["dlq", "show", first, "--json"])
    assert shown.exit_code == 0, shown.output
    detail = json.loads(shown.stdout)
    assert detail["last_error"] == "KeyError: 'sku' in #0"
    assert detail["attempts"] == 1
    assert detail["event"]["specversion"] == "1.0"
    assert detail["event"]["id"] == items[0]["message_id"]
    assert detail["event"]["data"] == {"n": 0}

    replayed = runner.invoke(app, ["dlq", "replay", first, "--json"])
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.stdout) == {"replayed": 1}
    statuses = {str(letter.id): letter.status for letter in asyncio.run(_letters(db_url))}
    assert statuses[first] == DeadLetterStatus.REPLAYING
    assert sorted(statuses.values()).count(DeadLetterStatus.DEAD) == 2
    # Replaying it again while it is queued: nothing to do, and the exit code says so.
    assert runner.invoke(app, ["dlq", "replay", first]).exit_code == 1


def test_replay_all_of_a_topic_and_errors(db_url: str) -> None:
    asyncio.run(_kill(db_url, topic=TOPIC, group="billing", count=3))
    asyncio.run(_kill(db_url, topic="mercato.payments", group="ledger", count=1))

    result = runner.invoke(app, ["dlq", "replay", "--all", "--topic", TOPIC, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"replayed": 3}
    by_topic = {(letter.topic, letter.status) for letter in asyncio.run(_letters(db_url))}
    assert by_topic == {(TOPIC, DeadLetterStatus.REPLAYING), ("mercato.payments", DeadLetterStatus.DEAD)}

    assert runner.invoke(app, ["dlq", "replay"]).exit_code == 2
    assert runner.invoke(app, ["dlq", "show", "not-an-id"]).exit_code == 2
    assert runner.invoke(app, ["dlq", "show", "01a21430-e079-76d3-8f9c-3fc7a1927704"]).exit_code == 1


def test_replayed_letter_is_delivered_to_its_group_again(db_url: str) -> None:
    asyncio.run(_kill(db_url, topic=TOPIC, group="billing", count=1))
    assert runner.invoke(app, ["dlq", "replay", "--all"]).exit_code == 0

    async def consume() -> list[str]:
        db = create_database(db_url)
        try:
            stream = SqlLogStream(db, partitions=1)
            batch = await stream.read(TOPIC, "billing", "c9", max_messages=10, block_s=0)
            for delivery in batch:
                await stream.ack(delivery)
            return [d.message.subject for d in batch]
        finally:
            await db.dispose()

    assert asyncio.run(consume()) == ["order-0"]
    listed = json.loads(runner.invoke(app, ["dlq", "list", "--json"]).stdout)["items"]
    assert listed[0]["status"] == "replayed"
    assert listed[0]["replayed_at"] is not None
