"""The SMTP side of the mail provider: aiosmtpd's protocol in the host's event loop, with faults.

aiosmtpd's `Controller` would run the server on a thread with a loop of its own; the mailbox's
database (inline SQLite) belongs to the loop that opened it, and `mercato up` runs every simulator
in one loop, so the protocol is served with `loop.create_server` instead.

Each `DATA` draws a `FaultDecision` from the same injector as the HTTP side (`PUT /admin/faults`):

=============  ============================================================================
fault          what the sender sees
=============  ============================================================================
none           `250` after the drawn latency; the message stored (or found: duplicate)
error          `451 4.3.0` (transient, retry later); nothing stored
outage         `421 4.3.0` and the connection closed; nothing stored
hang           no answer until `hang_max_s`, then the connection dropped; nothing stored
lost_response  the message stored, then the connection dropped without an answer
=============  ============================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from mercato.kit.observability import get_logger
from mercato.providers._edge import ProviderMetrics
from mercato.providers.faults import FaultInjector, FaultKind
from mercato.providers.mail.service import Mailbox

__all__ = ["MailHandler", "SmtpServer"]

_log = get_logger("mercato.providers.mail")
# aiosmtpd logs every command at INFO, envelope addresses included: no raw e-mail addresses in our logs.
logging.getLogger("mail.log").setLevel(logging.WARNING)
MAX_MESSAGE_BYTES = 1_048_576


class MailHandler:
    """aiosmtpd's handler hooks: accept `DATA` into the mailbox, under the injected faults."""

    def __init__(self, mailbox: Mailbox, *, injector: FaultInjector, metrics: ProviderMetrics) -> None:
        self.mailbox = mailbox
        self.injector = injector
        self.metrics = metrics

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        decision = self.injector.decide()
        self.metrics.count_received(method="SMTP", route="DATA", fault=decision.kind)
        kind = decision.kind
        if kind is FaultKind.OUTAGE:
            return "421 4.3.0 Simulated outage: message not accepted, try again later"
        if kind is FaultKind.ERROR:
            await asyncio.sleep(decision.latency_s)
            return "451 4.3.0 Injected error: message not accepted, try again later"
        if kind is FaultKind.HANG:
            await asyncio.sleep(self.injector.settings.hang_max_s)
            _drop(server)
            return "451 4.3.0 gave up"  # never reaches the sender: the connection is gone
        if decision.latency_s > 0:
            await asyncio.sleep(decision.latency_s)
        raw = envelope.original_content or b""
        accepted = await self.mailbox.accept(
            mail_from=str(envelope.mail_from or ""), rcpt_tos=list(envelope.rcpt_tos), raw=raw
        )
        _log.info(
            "mail_accepted", id=accepted.id, duplicate=accepted.duplicate, recipients=len(envelope.rcpt_tos)
        )
        if kind is FaultKind.LOST_RESPONSE:
            _drop(server)
            return "250 OK"  # stored, but the sender never hears it
        verb = "duplicate of" if accepted.duplicate else "queued as"
        return f"250 OK {verb} {accepted.id}"


def _drop(server: SMTP) -> None:
    # asyncio's and uvloop's TCP transports both have abort(); the annotation says BaseTransport.
    abort = getattr(server.transport, "abort", None)
    if callable(abort):
        abort()


class SmtpServer:
    """`start()` binds `host:port` (0: a free port, see `port`) in the running loop; `stop()` closes."""

    def __init__(self, handler: MailHandler, *, host: str, port: int) -> None:
        self.handler = handler
        self.host = host
        self.requested_port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self.requested_port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def protocol() -> Any:
            return SMTP(
                self.handler,
                hostname="mail.mercato.local",
                data_size_limit=MAX_MESSAGE_BYTES,
                timeout=60,
                loop=loop,
            )

        self._server = await loop.create_server(protocol, host=self.host, port=self.requested_port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), timeout=2.0)
