"""The notifier's direct bytes for a plain ASCII mail read, at the mail provider, exactly as the
email package's rendering of the same mail does; anything else is left to the email package."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest
from aiosmtplib.email import flatten_message

from mercato.providers.mail.service import _parse
from mercato.shop.notifications.delivery import OutgoingMail
from mercato.shop.notifications.smtp import _simple_raw

DATE = "Sun, 06 Dec 2026 19:41:34 +0000"


def _mail(**changes: str) -> OutgoingMail:
    values = {
        "message_id": "<notification-0193a0c1-7c1e-7d5e-9b1a-3c2d1e0f4a5b@mercato.local>",
        "sender": "orders@mercato.local",
        "recipient": "buyer-123@example.com",
        "subject": "Your order 0193a0c1-7c1e-7d5e-9b1a-3c2d1e0f4a5b is on its way",
        "body": "Thank you for your order 0193a0c1-7c1e-7d5e-9b1a-3c2d1e0f4a5b. We charged 25.99 EUR "
        "and handed it to the carrier.",
    }
    return OutgoingMail(**(values | changes))


def _rendered(mail: OutgoingMail) -> bytes:
    message = EmailMessage()
    message["From"] = mail.sender
    message["To"] = mail.recipient
    message["Subject"] = mail.subject
    message["Message-ID"] = mail.message_id
    message["Date"] = DATE
    message.set_content(mail.body)
    return flatten_message(message)


@pytest.mark.parametrize(
    "mail",
    [
        _mail(),
        _mail(body="two\nlines\n"),
        _mail(body=".a line that starts with a dot\n..and two"),
        _mail(subject="Your order x was cancelled", body="We could not complete your order x."),
    ],
)
def test_a_plain_mail_reads_the_same_as_the_email_packages(mail: OutgoingMail) -> None:
    raw = _simple_raw(mail, DATE)
    assert raw is not None
    assert _parse(raw) == _parse(_rendered(mail))
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["To"] == mail.recipient
    assert parsed["Date"] == DATE


@pytest.mark.parametrize(
    "mail",
    [
        _mail(subject="Ihre Bestellung ist unterwegs – danke"),
        _mail(recipient="bücher@example.com"),
        _mail(subject="x" * 80),
        _mail(subject="injected\r\nBcc: someone@example.com"),
        _mail(body="a" * 1000),
        _mail(body="Grüße"),
    ],
)
def test_anything_else_is_left_to_the_email_package(mail: OutgoingMail) -> None:
    assert _simple_raw(mail, DATE) is None
