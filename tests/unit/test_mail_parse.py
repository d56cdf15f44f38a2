"""The mail simulator's message parsing (ADR 0071): a simple message (one text/plain part, plain
ASCII headers) is read by the legacy parser, ~15× cheaper, with exactly the full parser's result;
anything else is read by the full one."""

from __future__ import annotations

from email.message import EmailMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from mercato.providers.mail.service import _parse, _parse_full, _parse_simple


def _message(
    subject: str, body: str, *, charset: str | None = None, message_id: str | None = "<a@b>"
) -> bytes:
    # Built as the shop's notifier builds its mail (shop/notifications/smtp.py), sent with CRLF.
    message = EmailMessage()
    message["From"] = "shop@mercato.local"
    message["To"] = "customer@example.com"
    message["Subject"] = subject
    if message_id is not None:
        message["Message-ID"] = message_id
    if charset is None:
        message.set_content(body)
    else:
        message.set_content(body, charset=charset)
    return message.as_bytes().replace(b"\n", b"\r\n")


SIMPLE = [
    _message("Your order is confirmed", "Hello,\n\nTotal: 12.50 EUR\n"),
    _message("UTF-8 in the body", "Grüße, 8-bit UTF-8\n"),
    _message("Latin-1", "café\n", charset="latin-1"),
    _message("Long lines", ("ü" * 200 + "\n") * 3),
    _message("No id", "body\n", message_id=None),
    b"Subject: hi\r\nMessage-ID: <x@y>\r\n\r\nno MIME headers at all\r\n",
    b"Subject: hi\r\nMessage-ID: <x@y>\r\nContent-Type: text/plain; charset=latin-1\r\n\r\ncaf\xe9\r\n",
]
FULL = [
    _message("Encoded — subject", "body\n"),  # an RFC 2047 encoded word
    _message("A subject long enough to be folded by the generator onto a second header line", "x\n"),
    MIMEMultipart(
        "alternative", _subparts=[MIMEText("hi", "plain"), MIMEText("<p>hi</p>", "html")]
    ).as_bytes(),
    b"Subject:   spaced   \r\nMessage-ID: <x@y>\r\n\r\nbody\r\n",
    b"Subject: hi\r\nContent-Disposition: attachment\r\n\r\nbody\r\n",
    b"Subject: hi\r\nContent-Type: text/html\r\n\r\n<p>body</p>\r\n",
]


@pytest.mark.parametrize("raw", SIMPLE)
def test_a_simple_message_takes_the_cheap_parser_with_the_same_result(raw: bytes) -> None:
    assert _parse_simple(raw) is not None
    assert _parse(raw) == _parse_full(raw)


@pytest.mark.parametrize("raw", FULL)
def test_anything_else_goes_through_the_full_parser(raw: bytes) -> None:
    assert _parse_simple(raw) is None
    assert _parse(raw) == _parse_full(raw)
