"""The SMTP adapter of `MailSender` (aiosmtplib): one connection per mail, explicit timeout.

SMTP's own classification decides what is worth a retry: a 5xx reply is a permanent refusal
(`DeliveryRejected`); a 4xx reply, a refused or dropped connection and a timeout are transient and
propagate as they are, for the notifier to retry with the same `Message-ID`.
"""

from __future__ import annotations

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

    async def send(self, mail: OutgoingMail) -> None:
        message = EmailMessage()
        message["From"] = mail.sender
        message["To"] = mail.recipient
        message["Subject"] = mail.subject
        message["Message-ID"] = mail.message_id
        message["Date"] = format_datetime(self._clock.now())
        message.set_content(mail.body)
        try:
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
