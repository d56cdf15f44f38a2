"""The SMTP adapter of `MailSender` (aiosmtplib): explicit timeout; inside a `session()` the sends
share one connection (one connect, greeting and EHLO per notifier pass, not per mail).

SMTP's own classification decides what is worth a retry: a 5xx reply is a permanent refusal
(`DeliveryRejected`); a 4xx reply, a refused or dropped connection and a timeout are transient and
propagate as they are, for the notifier to retry with the same `Message-ID`.

A plain ASCII text mail (every notification this shop renders) is written as bytes directly; any
other goes through the email package (`_simple_raw`).

A shared connection is dropped after any failure (the next mail connects afresh, as every mail did
before), so one mail's fault never becomes the next one's; it lives for one pass, so no idle
connection is kept open between passes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from email.message import EmailMessage
from email.utils import format_datetime

import aiosmtplib

from mercato.kit.clock import Clock
from mercato.shop.notifications.delivery import DeliveryRejected, OutgoingMail

__all__ = ["SmtpMailSender"]


class SmtpMailSender:
    def __init__(self, *, host: str, port: int, timeout_s: float, clock: Clock) -> None:
        self._host = host
        self._port = port
        self._timeout_s = timeout_s
        self._clock = clock
        self._in_session = False
        self._client: aiosmtplib.SMTP | None = None

    @asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        self._in_session = True
        try:
            yield
        finally:
            self._in_session = False
            await self._close(quit_first=True)

    async def send(self, mail: OutgoingMail) -> None:
        date = format_datetime(self._clock.now())
        raw = _simple_raw(mail, date)
        message: EmailMessage | bytes
        if raw is not None:
            message = raw
        else:
            message = EmailMessage()
            message["From"] = mail.sender
            message["To"] = mail.recipient
            message["Subject"] = mail.subject
            message["Message-ID"] = mail.message_id
            message["Date"] = date
            message.set_content(mail.body)
        try:
            if self._in_session:
                await self._send_on_session(message, mail)
            elif isinstance(message, bytes):
                await aiosmtplib.send(
                    message,
                    sender=mail.sender,
                    recipients=[mail.recipient],
                    hostname=self._host,
                    port=self._port,
                    timeout=self._timeout_s,
                    start_tls=False,
                    use_tls=False,
                )
            else:
                await aiosmtplib.send(
                    message,
                    hostname=self._host,
                    port=self._port,
                    timeout=self._timeout_s,
                    start_tls=False,
                    use_tls=False,
                )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            if all(error.code >= 500 for error in exc.recipients):
                raise DeliveryRejected(str(exc)) from exc
            raise
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code >= 500:
                raise DeliveryRejected(f"{exc.code} {exc.message}") from exc
            raise

    async def _send_on_session(self, message: EmailMessage | bytes, mail: OutgoingMail) -> None:
        try:
            client = await self._connected()
            if isinstance(message, bytes):
                await client.sendmail(mail.sender, [mail.recipient], message)
            else:
                await client.send_message(message)
        except BaseException:
            await self._close(quit_first=False)
            raise

    async def _connected(self) -> aiosmtplib.SMTP:
        client = self._client
        if client is None or not client.is_connected:
            client = aiosmtplib.SMTP(
                hostname=self._host, port=self._port, timeout=self._timeout_s, start_tls=False, use_tls=False
            )
            await client.connect()
            self._client = client
        return client

    async def _close(self, *, quit_first: bool) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        with suppress(Exception):
            if quit_first and client.is_connected:
                await client.quit()
        client.close()


# What `EmailMessage` with the default policy writes for a plain ASCII text mail, built directly: the
# email package's header objects and generator cost ~0.7 ms of the worker's CPU per mail on this
# VM, for bytes that are fixed but for five values.
_HEADER_LINE_MAX = 78  # the policy folds longer header lines: those go through `EmailMessage`
_BODY_LINE_MAX = 998  # RFC 5322; longer lines need an encoding: `EmailMessage` (quoted-printable)


def _simple_raw(mail: OutgoingMail, date: str) -> bytes | None:
    """The message's bytes when it is plain ASCII with short lines and no line breaks in its header
    values; None otherwise (the caller then builds it with `EmailMessage`)."""
    headers = (
        ("From", mail.sender),
        ("To", mail.recipient),
        ("Subject", mail.subject),
        ("Message-ID", mail.message_id),
        ("Date", date),
    )
    lines = []
    for name, value in headers:
        line = f"{name}: {value}"
        if not value or not line.isascii() or len(line) > _HEADER_LINE_MAX or "\r" in value or "\n" in value:
            return None
        lines.append(line)
    body = mail.body.replace("\r\n", "\n")
    if not body.isascii() or "\r" in body or any(len(line) > _BODY_LINE_MAX for line in body.split("\n")):
        return None
    if not body.endswith("\n"):
        body += "\n"
    lines += [
        'Content-Type: text/plain; charset="utf-8"',
        "Content-Transfer-Encoding: 7bit",
        "MIME-Version: 1.0",
        "",
        body,
    ]
    return "\r\n".join(lines[:-1]).encode("ascii") + b"\r\n" + body.replace("\n", "\r\n").encode("ascii")
