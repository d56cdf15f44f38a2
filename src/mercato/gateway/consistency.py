"""Read-your-writes across replicas: the consistency token at the HTTP edge (ADR 0032).

A request may present `Mercato-Consistency-Token: <LSN>` (or the `mercato_ct` cookie): its reads
that accept staleness are served by a replica only once that replica has replayed the LSN. A
response to a request that committed a write carries the commit LSN in the same header and cookie,
so a browser gets read-your-writes without doing anything and an API client by echoing the header.
A malformed token is ignored (the read then goes by staleness alone): it is a hint, not an input.
Installed only when read replicas are configured.
"""

from __future__ import annotations

import contextlib
import math
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Scope

from mercato.kit.cache import open_staleness_scope
from mercato.kit.storage import consistency_scope, format_lsn, parse_lsn

if TYPE_CHECKING:
    from mercato.gateway.edge import Exchange

TOKEN_HEADER = "mercato-consistency-token"  # noqa: S105 - a header name, not a secret
TOKEN_COOKIE = "mercato_ct"  # noqa: S105 - a cookie name
# Long enough for a session's next reads; a stale token only costs a wait, never a wrong answer.
COOKIE_MAX_AGE_S = 300


def _presented(scope: Scope) -> int | None:
    header = None
    cookie = None
    for name, value in scope.get("headers", []):
        if name == TOKEN_HEADER.encode():
            header = value.decode("latin-1")
        elif name == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            with contextlib.suppress(Exception):  # a malformed cookie header carries no token
                jar.load(value.decode("latin-1"))
            if TOKEN_COOKIE in jar:
                cookie = jar[TOKEN_COOKIE].value
    tokens = []
    for raw in (header, cookie):
        if raw:
            try:
                tokens.append(parse_lsn(raw))
            except ValueError:
                continue
    return max(tokens) if tokens else None


_TOKEN_HEADER = TOKEN_HEADER.encode()


class ConsistencyToken:
    """Edge step: reads wait for the presented LSN; a request that wrote answers with its commit LSN."""

    async def __call__(self, ex: Exchange) -> ASGIApp | None:
        scope = consistency_scope(after=_presented(ex.scope))
        tokens = scope.__enter__()
        ex.defer(lambda: scope.__exit__(None, None, None))

        def add_token(_status: int, headers: list[tuple[bytes, bytes]]) -> None:
            if tokens.written is not None:
                lsn = format_lsn(tokens.written)
                headers.append((_TOKEN_HEADER, lsn.encode()))
                cookie = f"{TOKEN_COOKIE}={lsn}; Max-Age={COOKIE_MAX_AGE_S}; Path=/; HttpOnly; SameSite=Lax"
                headers.append((b"set-cookie", cookie.encode()))

        ex.on_start(add_token)
        return None


STALENESS_HEADER = "mercato-staleness"
_STALENESS_HEADER = STALENESS_HEADER.encode()


class StalenessHeader:
    """Edge step: `Mercato-Staleness: <seconds>` on a response built from data past its freshness
    lifetime (RFC 9111's staleness, rounded up): served by the cache while it revalidates, or because
    the primary database failed or was unreachable (stale-if-error; the CAP stance of the catalog,
    docs/consistency.md). Absent on a response read from the primary or from fresh cache."""

    async def __call__(self, ex: Exchange) -> ASGIApp | None:
        stale, close = open_staleness_scope()
        ex.defer(close)

        def add_staleness(_status: int, headers: list[tuple[bytes, bytes]]) -> None:
            if stale.staleness_s is not None:
                headers.append((_STALENESS_HEADER, str(math.ceil(stale.staleness_s)).encode()))

        ex.on_start(add_staleness)
        return None
