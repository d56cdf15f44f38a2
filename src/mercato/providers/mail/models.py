"""What the mail provider shows over HTTP: the messages it accepted, newest last."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

__all__ = ["MailOut", "MailPage"]


class MailOut(BaseModel):
    id: str
    message_id: str = Field(description="The `Message-ID` header: the dedup key of a delivery.")
    mail_from: str = Field(description="The SMTP envelope sender (`MAIL FROM`).")
    recipients: list[str] = Field(description="The SMTP envelope recipients (`RCPT TO`).")
    subject: str
    body: str = Field(description="The text/plain part.")
    received_at: datetime


class MailPage(BaseModel):
    items: list[MailOut] = Field(default_factory=list)
    next_cursor: str | None = None
