"""The mail provider: an SMTP server of ours (aiosmtpd) that stores what it accepts, dedups on
`Message-ID`, shows it over HTTP (`GET /messages`) and fails on demand like the PSP and carrier."""

from mercato.providers.mail.app import create_mail_app
from mercato.providers.mail.models import MailOut, MailPage
from mercato.providers.mail.service import Mailbox, mail_metadata

__all__ = ["MailOut", "MailPage", "Mailbox", "create_mail_app", "mail_metadata"]
