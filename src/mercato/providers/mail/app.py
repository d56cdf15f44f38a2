"""The mail provider as one app: SMTP in (port `smtp_port`) and HTTP out (`GET /messages`, faults).

The HTTP app's lifespan opens the mailbox and the SMTP listener, so whatever serves the app (the
`mercato provider mail` command, `mercato up`) serves both.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Query
from prometheus_client import CollectorRegistry

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.web.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from mercato.kit.web.problems import problem_responses
from mercato.providers._edge import ProviderApp, add_common_routes
from mercato.providers._storage import provider_database
from mercato.providers.faults import FaultInjector, FaultSettings
from mercato.providers.mail.models import MailPage
from mercato.providers.mail.service import Mailbox
from mercato.providers.mail.smtp import MailHandler, SmtpServer

__all__ = ["create_mail_app"]


def create_mail_app(
    database_url: str,
    *,
    smtp_host: str = "127.0.0.1",
    smtp_port: int = 2525,
    faults: FaultSettings | None = None,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> ProviderApp:
    """Build the mail provider. No I/O here: tables and the SMTP listener start with the lifespan.

    `app.state.smtp.port` is the bound SMTP port once started (useful with `smtp_port=0`).
    """
    clock = clock or SystemClock()
    settings = faults or FaultSettings()
    mailbox = Mailbox(provider_database(database_url), clock=clock)
    injector = FaultInjector(settings, clock=clock, rng=rng or random.Random(settings.seed))
    registry = CollectorRegistry()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await mailbox.start()
        await smtp.start()
        try:
            yield
        finally:
            await smtp.stop()
            await mailbox.close()

    app = ProviderApp(
        provider="mail",
        injector=injector,
        registry=registry,
        title="Mercato mail provider",
        version="1",
        lifespan=lifespan,
    )
    smtp = SmtpServer(
        MailHandler(mailbox, injector=injector, metrics=app.metrics), host=smtp_host, port=smtp_port
    )
    app.state.mailbox = mailbox
    app.state.smtp = smtp
    add_common_routes(app, ready=mailbox.db.ping)

    @app.get("/messages", response_model=MailPage, responses=problem_responses(400), tags=["mail"])
    async def list_messages(
        recipient: Annotated[
            str | None, Query(max_length=320, description="Only mail to this address.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
        cursor: Annotated[str | None, Query(max_length=512)] = None,
    ) -> MailPage:
        """Accepted messages, oldest first (keyset pagination); a repeated `Message-ID` is stored once."""
        return await mailbox.page(recipient=recipient, limit=limit, cursor=cursor)

    return app
