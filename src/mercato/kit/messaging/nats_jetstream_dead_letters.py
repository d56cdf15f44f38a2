"""`JetStreamStream`'s dead letters: storing a message that used up its attempts in the KV bucket
`P_dlq` (one key per letter) and `+TERM`ing it, listing and reading letters, and replaying them
through the work-queue stream `P_dlqreplay` (one durable consumer per (topic, group), so only their own
group receives them) until the replay is acked (replayed) or nacked (dead again).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy
from nats.js.errors import KeyDeletedError, KeyNotFoundError

from mercato.kit.ids import new_id
from mercato.kit.messaging.message import Message
from mercato.kit.messaging.nats_jetstream_core import JetStreamCore, token
from mercato.kit.messaging.stream import (
    DEAD_LETTER_RECEIPT_PREFIX,
    DeadLetter,
    DeadLetterStatus,
    Delivery,
)

__all__ = ["JetStreamDeadLetters"]

_DLQ_RECEIPT = DEAD_LETTER_RECEIPT_PREFIX


class JetStreamDeadLetters(JetStreamCore):
    """The dead-letter half of `JetStreamStream`: its `dead_letters`, `dead_letter` and
    `replay_dead_letters`, and what reading and settling call to store, queue and settle letters."""

    # ---- names ---------------------------------------------------------------------------------

    @property
    def _replay_stream(self) -> str:
        return f"{self.prefix}_dlqreplay"

    def _replay_subject(self, topic: str, group: str) -> str:
        return f"{self.prefix}.dlqreplay.{token(topic)}.{token(group)}"

    # ---- storing letters -----------------------------------------------------------------------

    async def _dead_letter(
        self, msg: Msg, group: str, topic: str, partition: int, attempts: int, error: str
    ) -> None:
        seq = msg.metadata.sequence.stream
        await self._store_letter(msg.data, group, topic, partition, seq, attempts, error)
        await self._respond(msg.reply, b"+TERM")

    async def _store_letter(
        self, envelope: bytes, group: str, topic: str, partition: int, seq: int, attempts: int, error: str
    ) -> None:
        letter_id = str(new_id())
        letter = {
            "id": letter_id,
            "group": group,
            "topic": topic,
            "partition": partition,
            "offset": seq - 1,
            "envelope": envelope.decode(),
            "attempts": attempts,
            "last_error": error[:4000],
            "dead_at": self._clock.now().isoformat(),
            "status": DeadLetterStatus.DEAD.value,
            "replayed_at": None,
        }
        kv = await self._bucket("dlq")
        await kv.put(letter_id, orjson.dumps(letter))
        self._hook.dead_lettered(group=group, topic=topic)

    # ---- replaying letters ---------------------------------------------------------------------

    async def _take_replays(self, topic: str, group: str, consumer: str, limit: int) -> list[Delivery]:
        now = time.monotonic()
        if now - self._replay_checked.get((topic, group), float("-inf")) < self.replay_check_interval_s:
            return []
        self._replay_checked[(topic, group)] = now
        await self._ensure_replay_stream()
        durable = f"dlq-{token(topic)}-{token(group)}"
        await self._ensure_consumer(self._replay_stream, durable, self._replay_subject(topic, group))
        out: list[Delivery] = []
        kv = await self._bucket("dlq")
        for msg in await self._pull(self._replay_stream, durable, limit):
            letter_id = msg.data.decode()
            try:
                letter = orjson.loads((await kv.get(letter_id)).value or b"{}")
            except KeyNotFoundError:
                letter = {}
            if letter.get("status") != DeadLetterStatus.REPLAYING.value:
                await self._respond(msg.reply, b"+ACK")
                continue
            out.append(
                Delivery(
                    message=Message.from_json(letter["envelope"]),
                    topic=topic,
                    group=group,
                    consumer=consumer,
                    partition=int(letter["partition"]),
                    offset=int(letter["offset"]),
                    attempt=int(letter["attempts"]) + 1,
                    receipt=f"{_DLQ_RECEIPT}{letter_id}|{msg.reply}",
                )
            )
        if out:
            # More may be queued behind these: look again on the next read.
            self._replay_checked.pop((topic, group), None)
        return out

    async def _ensure_replay_stream(self) -> None:
        await self._ensure_stream(
            self._replay_stream,
            [f"{self.prefix}.dlqreplay.>"],
            retention=RetentionPolicy.WORK_QUEUE,
        )

    async def _settle_replay(self, delivery: Delivery, *, error: str | None) -> None:
        letter_id, reply = delivery.receipt.removeprefix(_DLQ_RECEIPT).split("|", 1)
        kv = await self._bucket("dlq")
        try:
            entry = await kv.get(letter_id)
        except KeyNotFoundError:
            return
        letter = orjson.loads(entry.value or b"{}")
        if letter.get("status") != DeadLetterStatus.REPLAYING.value:
            return
        now = self._clock.now().isoformat()
        if error is None:
            letter.update(status=DeadLetterStatus.REPLAYED.value, replayed_at=now)
        else:
            # A replay that fails goes straight back to the queue: it already used its attempts.
            letter.update(
                status=DeadLetterStatus.DEAD.value,
                attempts=int(letter["attempts"]) + 1,
                last_error=error[:4000],
                dead_at=now,
            )
        # Compare-and-set on the revision: a concurrent settle of the same letter loses cleanly.
        await kv.update(letter_id, orjson.dumps(letter), last=entry.revision)
        await self._respond(reply, b"+ACK")
        if error is not None:
            self._hook.dead_lettered(group=delivery.group, topic=delivery.topic)

    # ---- listing letters -----------------------------------------------------------------------

    async def _letters(self) -> list[tuple[dict[str, Any], int]]:
        kv = await self._bucket("dlq")
        out = []
        for key in sorted(await self._letter_ids()):  # UUIDv7 strings: lexical order is dead order
            try:
                entry = await kv.get(key)
            except (KeyNotFoundError, KeyDeletedError):
                continue
            out.append((orjson.loads(entry.value or b"{}"), entry.revision or 0))
        return out

    async def _letter_ids(self) -> list[str]:
        """Every key of the bucket, from its stream's subjects: one request, answered by the server.
        Not `kv.keys()`: nats-py's watcher takes "nothing pending, nothing run yet" for an empty
        bucket when the server has pushed the keys but the watcher has not run them, so a listing
        could come back empty while the bucket held a letter (a replay found nothing to replay right
        after `dead_letters` showed it: `test_projections_stream`'s dead-letter test on NATS, in CI)."""
        bucket = f"{self.prefix}_dlq"
        js = await self._js()
        info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.>")
        return [subject[len(f"$KV.{bucket}.") :] for subject in (info.state.subjects or {})]

    async def dead_letters(
        self, *, topic: str | None = None, group: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        out = []
        for letter, _ in await self._letters():
            if (topic is None or letter["topic"] == topic) and (group is None or letter["group"] == group):
                out.append(_dead_letter(letter))
                if len(out) >= limit:
                    break
        return out

    async def dead_letter(self, dead_letter_id: uuid.UUID) -> DeadLetter | None:
        kv = await self._bucket("dlq")
        try:
            entry = await kv.get(str(dead_letter_id))
        except KeyNotFoundError:
            return None
        return _dead_letter(orjson.loads(entry.value or b"{}"))

    async def replay_dead_letters(
        self, *, ids: Sequence[uuid.UUID] | None = None, topic: str | None = None
    ) -> int:
        wanted = None if ids is None else {str(i) for i in ids}
        allowed = {DeadLetterStatus.DEAD.value}
        if ids is not None:
            # Named explicitly: a letter already replayed once may be replayed again.
            allowed.add(DeadLetterStatus.REPLAYED.value)
        await self._ensure_replay_stream()
        js = await self._js()
        kv = await self._bucket("dlq")
        queued = 0
        for letter, revision in await self._letters():
            if wanted is not None and letter["id"] not in wanted:
                continue
            if letter["status"] not in allowed or (topic is not None and letter["topic"] != topic):
                continue
            letter["status"] = DeadLetterStatus.REPLAYING.value
            await kv.update(letter["id"], orjson.dumps(letter), last=revision)
            await js.publish(self._replay_subject(letter["topic"], letter["group"]), letter["id"].encode())
            self._replay_checked.pop((letter["topic"], letter["group"]), None)
            queued += 1
        return queued


def _dead_letter(letter: dict[str, Any]) -> DeadLetter:
    return DeadLetter(
        id=uuid.UUID(letter["id"]),
        group=letter["group"],
        topic=letter["topic"],
        partition=int(letter["partition"]),
        offset=int(letter["offset"]),
        message=Message.from_json(letter["envelope"]),
        attempts=int(letter["attempts"]),
        last_error=letter["last_error"],
        dead_at=datetime.fromisoformat(letter["dead_at"]),
        status=DeadLetterStatus(letter["status"]),
        replayed_at=datetime.fromisoformat(letter["replayed_at"]) if letter["replayed_at"] else None,
    )
