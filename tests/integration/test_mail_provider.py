"""The mail provider on real ports (SMTP in, HTTP out), on SQLite and PostgreSQL: dedup, filter, faults."""

from __future__ import annotations

import uuid
from email.message import EmailMessage
from typing import TYPE_CHECKING

import aiosmtplib
import httpx
import pytest

from mercato.providers import create_mail_app
from mercato.providers.mail import mail_metadata

if TYPE_CHECKING:
    from tests.integration.provider_support import Served

pytest_plugins = ["tests.integration.provider_support"]


def _mail(to: str, message_id: str, subject: str = "Hello") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "orders@mercato.local"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = message_id
    message.set_content("Thank you for your order.")
    return message


async def test_mail_is_stored_once_per_message_id_and_listed_by_recipient(
    provider_db_url: str, on_a_port: Served
) -> None:
    app = create_mail_app(provider_db_url, smtp_port=0)
    async with on_a_port(app, mail_metadata) as base_url, httpx.AsyncClient(base_url=base_url) as http:
        smtp_port = app.state.smtp.port
        alice, bob = f"alice-{uuid.uuid4().hex[:6]}@example.com", f"bob-{uuid.uuid4().hex[:6]}@example.com"
        first = f"<{uuid.uuid4().hex}@test>"
        for _ in range(2):  # the second is a retry after a lost answer: same Message-ID
            _, reply = await aiosmtplib.send(
                _mail(alice, first), hostname="127.0.0.1", port=smtp_port, start_tls=False, timeout=5
            )
        assert reply.startswith("OK duplicate of")
        await aiosmtplib.send(
            _mail(bob, f"<{uuid.uuid4().hex}@test>", "Other"),
            hostname="127.0.0.1",
            port=smtp_port,
            start_tls=False,
            timeout=5,
        )
        to_alice = (await http.get("/messages", params={"recipient": alice.upper()})).json()["items"]
        assert [(m["message_id"], m["subject"], m["recipients"]) for m in to_alice] == [
            (first, "Hello", [alice])
        ]
        assert to_alice[0]["body"] == "Thank you for your order.\n"
        assert len((await http.get("/messages")).json()["items"]) == 2
        page = (await http.get("/messages", params={"limit": 1})).json()
        assert page["next_cursor"] is not None
        assert (await http.get("/messages", params={"limit": 0})).status_code == 400

        # An injected error is a transient SMTP reply and stores nothing.
        (await http.put("/admin/faults", json={"error_rate": 1.0})).raise_for_status()
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await aiosmtplib.send(
                _mail(alice, f"<{uuid.uuid4().hex}@test>"),
                hostname="127.0.0.1",
                port=smtp_port,
                start_tls=False,
                timeout=5,
            )
        assert refused.value.code == 451
        # A lost answer: stored, but the sender only sees the connection drop.
        (await http.put("/admin/faults", json={"lost_response_rate": 1.0})).raise_for_status()
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await aiosmtplib.send(
                _mail(alice, f"<{uuid.uuid4().hex}@test>", "Lost"),
                hostname="127.0.0.1",
                port=smtp_port,
                start_tls=False,
                timeout=5,
            )
        subjects = [
            m["subject"] for m in (await http.get("/messages", params={"recipient": alice})).json()["items"]
        ]
        assert subjects == ["Hello", "Lost"]
