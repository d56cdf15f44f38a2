"""`IdempotencyMiddleware`: the IETF Idempotency-Key header as pure ASGI middleware.

Per request with a key on a covered method:

1. Validate the key, buffer the body (the body-size limit runs outside this middleware), fingerprint
   the request and resolve the caller's scope (keys are unique per caller, never global).
2. Claim (scope, key) in the store. A completed match is replayed byte for byte with
   `Idempotent-Replayed: true`; a different fingerprint is a 422; a live claim is a 409 with
   `Retry-After`, or, when `in_flight_wait_s > 0`, a short poll for the first response.
3. Run the app on the buffered body, capturing its response. Responses below 500 (except the
   "try again later" ones, 408/425/429) are stored before they are sent, so a client that saw the
   answer always gets the same answer again. An exception or a 5xx releases the claim instead:
   the handler did not finish, its transaction rolled back, and the client must be free to retry.
4. When the store itself cannot be reached at that moment (the database is down: the very outage that
   failed the handler), the release or the completion is retried in the background, with backoff,
   until it lands or the claim's lock lapses (ADR 0026). Without that the claim stayed in flight for
   the whole `lock_timeout_s` (60 s by default) after the database came back, refusing every retry
   with 409; and a lost completion let a later take-over run a finished request a second time.

The response is buffered whole, which suits the small JSON bodies of unsafe requests; streaming
responses should not sit behind an idempotency key.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import Awaitable, Callable, Collection, Iterable

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mercato.kit.auth import InvalidToken, TokenCodec
from mercato.kit.idempotency.fingerprint import (
    InvalidIdempotencyKey,
    parse_idempotency_key,
    request_fingerprint,
)
from mercato.kit.idempotency.metrics import IdempotencyHook, NullIdempotencyHook
from mercato.kit.idempotency.problems import (
    IdempotencyKeyInFlight,
    IdempotencyKeyMalformed,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
)
from mercato.kit.idempotency.store import (
    Claimed,
    ClaimOutcome,
    IdempotencyStore,
    InFlight,
    Mismatch,
    Replay,
    StoredResponse,
)
from mercato.kit.idempotency.tables import IN_FLIGHT, SCOPE_LENGTH
from mercato.kit.observability import get_logger, request_id_var
from mercato.kit.web.bodies import read_body, replaying
from mercato.kit.web.problems import problem_response
from mercato.kit.web.security import API_KEY_PRINCIPAL

__all__ = [
    "DEFAULT_REPLAY_HEADERS",
    "IdempotencyMiddleware",
    "PathRule",
    "ScopeResolver",
    "default_scope_resolver",
]

ScopeResolver = Callable[[Scope], Awaitable[str]]
# A path rule is an exact path ("/v1/checkout") or a compiled pattern matched against the whole path.
PathRule = str | re.Pattern[str]

# Representation and resource metadata a client needs to interpret the replayed response. Not
# replayed: per-moment headers (Date, RateLimit-*, Retry-After), per-request ones (X-Request-ID,
# added again outside), framing (Content-Length, recomputed) and anything secret (Set-Cookie).
DEFAULT_REPLAY_HEADERS = frozenset(
    {
        # A stored 405 must replay its Allow (RFC 9110 §15.5.6): schemathesis found one without it.
        "allow",
        "content-type",
        "content-language",
        "content-location",
        "location",
        "etag",
        "last-modified",
        "link",
        "cache-control",
        "preference-applied",
        "deprecation",
        "sunset",
    }
)

# Statuses that mean "not now" rather than "this is the answer": storing them would replay a
# transient refusal for a whole TTL.
_TRANSIENT_CLIENT_ERRORS = frozenset({408, 425, 429})


_ProblemKind = (
    type[IdempotencyKeyMissing]
    | type[IdempotencyKeyMalformed]
    | type[IdempotencyKeyReused]
    | type[IdempotencyKeyInFlight]
)

_log = get_logger("mercato.idempotency")


def _headers(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope.get("headers", ()) if key == name]


async def default_scope_resolver(scope: Scope) -> str:
    """`sub:<subject>` for a valid bearer token, `key:<id>` for an API key the edge verified, else
    `anon:<client address>` (partners sharing an address must not share keys' stored responses).

    Runs before routing, so it cannot use the route's auth dependency: it verifies the token itself
    with `app.state.token_codec` when the app has one. An invalid token falls back to the address;
    the route will answer 401 anyway. Behind a proxy the address is the client's because the gateway's
    request context has already resolved it from trusted proxies' forwarding headers (ADR 0019).
    """
    app = scope.get("app")
    codec = getattr(getattr(app, "state", None), "token_codec", None)
    authorization = _headers(scope, b"authorization")
    if isinstance(codec, TokenCodec) and len(authorization) == 1:
        scheme, _, token = authorization[0].strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            try:
                return "sub:" + codec.verify(token.strip()).subject
            except InvalidToken:
                pass
    key = scope.get("state", {}).get(API_KEY_PRINCIPAL)
    if key is not None:
        return "key:" + str(key.token_id)
    client = scope.get("client")
    return "anon:" + (str(client[0]) if client else "unknown")


def _bounded_scope(scope_id: str) -> str:
    if len(scope_id) <= SCOPE_LENGTH:
        return scope_id
    return "sha256:" + hashlib.sha256(scope_id.encode("utf-8", "surrogatepass")).hexdigest()


def _matches(rules: Collection[PathRule], path: str) -> bool:
    for rule in rules:
        if isinstance(rule, str):
            if rule == path:
                return True
        elif rule.fullmatch(path):
            return True
    return False


class _CapturedResponse:
    """Holds the app's response messages so it can be stored before it is sent."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.status: int | None = None
        self.raw_headers: list[tuple[bytes, bytes]] = []

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.raw_headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
        self.messages.append(message)

    @property
    def body(self) -> bytes:
        return b"".join(bytes(m.get("body", b"")) for m in self.messages if m["type"] == "http.response.body")

    async def flush(self, send: Send) -> None:
        for message in self.messages:
            await send(message)


class IdempotencyMiddleware:
    """Make unsafe requests that carry an `Idempotency-Key` safe to retry.

    `methods`: the methods that honour the header. `required_paths`: where a missing key is a 400
    (exact paths or compiled patterns). `excluded_paths`: never covered, e.g. login, whose response
    holds tokens that must not be stored. `ttl_s`: how long a completed response replays.
    `lock_timeout_s`: how long a claim blocks its key before a retry may take it over; keep it above
    the longest a request may run (the edge timeout), or a slow request could run twice.
    `in_flight_wait_s`: how long a duplicate waits, polling every `poll_interval_s`, for the first
    request to finish before getting 409. The default 0 answers 409 at once, as the draft says:
    holding a connection per duplicate is exactly wrong during a retry storm, and clients that retry
    honour `Retry-After` (`retry_after_s`).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: IdempotencyStore,
        methods: Iterable[str] = ("POST", "PATCH"),
        required_paths: Collection[PathRule] = (),
        excluded_paths: Collection[PathRule] = (),
        scope_resolver: ScopeResolver = default_scope_resolver,
        ttl_s: float = 86_400.0,
        lock_timeout_s: float = 60.0,
        in_flight_wait_s: float = 0.0,
        poll_interval_s: float = 0.05,
        retry_after_s: int = 1,
        replay_headers: Collection[str] = DEFAULT_REPLAY_HEADERS,
        hook: IdempotencyHook | None = None,
        settle_retry_s: float = 0.2,
    ) -> None:
        if lock_timeout_s <= 0 or ttl_s < lock_timeout_s:
            raise ValueError("need 0 < lock_timeout_s <= ttl_s")
        if in_flight_wait_s < 0 or poll_interval_s <= 0 or retry_after_s < 0:
            raise ValueError("in_flight_wait_s and retry_after_s must be >= 0, poll_interval_s > 0")
        self.app = app
        self.store = store
        self.methods = frozenset(m.upper() for m in methods)
        self.required_paths = tuple(required_paths)
        self.excluded_paths = tuple(excluded_paths)
        self.scope_resolver = scope_resolver
        self.ttl_s = ttl_s
        self.lock_timeout_s = lock_timeout_s
        self.in_flight_wait_s = in_flight_wait_s
        self.poll_interval_s = poll_interval_s
        self.retry_after_s = retry_after_s
        self.replay_headers = frozenset(h.lower() for h in replay_headers)
        self.hook: IdempotencyHook = hook or NullIdempotencyHook()
        # First wait before retrying a release/completion the store refused; doubles up to 2 s.
        self.settle_retry_s = settle_retry_s
        self._settling: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in self.methods
            or _matches(self.excluded_paths, scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        values = _headers(scope, b"idempotency-key")
        if not values:
            if _matches(self.required_paths, scope["path"]):
                await self._problem(
                    IdempotencyKeyMissing,
                    "send an Idempotency-Key header (for example a UUID) with this request",
                    scope,
                    receive,
                    send,
                )
            else:
                await self.app(scope, receive, send)
            return
        try:
            if len(values) > 1:
                raise InvalidIdempotencyKey("the Idempotency-Key header must appear once")
            key = parse_idempotency_key(values[0])
        except InvalidIdempotencyKey as exc:
            await self._problem(IdempotencyKeyMalformed, str(exc), scope, receive, send)
            return

        body, complete = await read_body(receive)
        if not complete:
            return  # the client went away mid-body: nobody to answer
        content_type = next(iter(_headers(scope, b"content-type")), None)
        fingerprint = request_fingerprint(
            method=scope["method"],
            path=scope["path"],
            body=body,
            content_type=content_type,
            query_string=bytes(scope.get("query_string", b"")),
        )
        caller = _bounded_scope(await self.scope_resolver(scope))
        # A store that is down raises out of here: the gateway edge answers it 503 with
        # Retry-After (ADR 0026); nothing was claimed, so a retry with the same key runs afresh.
        outcome = await self._claim(scope, caller, key, fingerprint)

        if isinstance(outcome, Replay):
            self.hook.replayed()
            await self._replay(outcome.response, send)
        elif isinstance(outcome, Mismatch):
            self.hook.conflicted()
            await self._problem(
                IdempotencyKeyReused,
                "this Idempotency-Key was used for a different request; use a new key",
                scope,
                receive,
                send,
            )
        elif isinstance(outcome, InFlight):
            self.hook.rejected_in_flight()
            await self._problem(
                IdempotencyKeyInFlight,
                "a request with this Idempotency-Key is still being processed",
                scope,
                receive,
                send,
                headers={"Retry-After": str(self.retry_after_s)},
            )
        else:
            await self._run(outcome, body, scope, receive, send)

    async def _claim(self, scope: Scope, caller: str, key: str, fingerprint: str) -> ClaimOutcome:
        def claim() -> Awaitable[ClaimOutcome]:
            return self.store.claim(
                scope=caller,
                key=key,
                method=scope["method"],
                path=scope["path"],
                fingerprint=fingerprint,
                ttl_s=self.ttl_s,
                lock_timeout_s=self.lock_timeout_s,
            )

        outcome = await claim()
        # Polling counts sleeps rather than reading a clock, so an injected manual clock (which
        # only moves when told) cannot turn the bounded wait into an endless one.
        polls = math.ceil(self.in_flight_wait_s / self.poll_interval_s)
        for _ in range(polls):
            if not isinstance(outcome, InFlight):
                break
            await anyio.sleep(self.poll_interval_s)
            record = await self.store.lookup(scope=caller, key=key)
            still_running = (
                record is not None
                and record.state == IN_FLIGHT
                and record.fingerprint == fingerprint
                and record.locked_until is not None
                and record.locked_until > self.store.clock.now()
            )
            if not still_running:
                outcome = await claim()
        return outcome

    async def _run(self, claim: Claimed, body: bytes, scope: Scope, receive: Receive, send: Send) -> None:
        captured = _CapturedResponse()
        try:
            await self.app(scope, replaying(body, receive), captured.send)
        except BaseException:
            await self._release(claim)
            raise
        status = captured.status
        if status is None:
            await self._release(claim)  # the app answered nothing; nothing to replay
            return
        if status < 500 and status not in _TRANSIENT_CLIENT_ERRORS:
            stored = StoredResponse(
                status=status,
                headers=tuple(
                    (name.decode("latin-1"), value.decode("latin-1"))
                    for name, value in captured.raw_headers
                    if name.decode("latin-1").lower() in self.replay_headers
                ),
                body=captured.body,
            )
            try:
                if await self.store.complete(claim, stored, ttl_s=self.ttl_s):
                    self.hook.stored()
                else:
                    _log.warning("idempotency_claim_lost", status=status)
            except Exception:  # noqa: BLE001 - the effect happened: still answer, and store it later
                # Until it lands a retry gets 409 (in flight); it must never find the key free and re-run.
                _log.exception("idempotency_store_failed", status=status)
                self._settle_later("complete", lambda: self.store.complete(claim, stored, ttl_s=self.ttl_s))
        else:
            await self._release(claim)
        await captured.flush(send)

    async def _release(self, claim: Claimed) -> None:
        # Shielded: this runs while an exception (possibly a cancellation) is unwinding, and an
        # unreleased claim would refuse the client's retries until its lock lapses.
        with anyio.CancelScope(shield=True):
            try:
                await self.store.release(claim)
                self.hook.released()
            except Exception as exc:  # noqa: BLE001 - never mask the handler's own error
                _log.warning("idempotency_release_failed", error=type(exc).__name__)
                self._settle_later("release", lambda: self.store.release(claim))

    def _settle_later(self, what: str, action: Callable[[], Awaitable[bool]]) -> None:
        """Retry `action` (a release or a completion) in the background until the store takes it."""
        task = asyncio.get_running_loop().create_task(self._keep_trying(what, action))
        self._settling.add(task)  # a strong reference: the loop keeps only weak ones
        task.add_done_callback(self._settling.discard)

    async def _keep_trying(self, what: str, action: Callable[[], Awaitable[bool]]) -> None:
        # Past the claim's lock the row is anyone's to take over: nothing left worth settling.
        delay_s, waited_s, last_error = self.settle_retry_s, 0.0, ""
        while waited_s < self.lock_timeout_s:
            await anyio.sleep(delay_s)
            waited_s += delay_s
            try:
                await action()
            except Exception as exc:  # noqa: BLE001 - still down: wait longer and try again
                delay_s = min(delay_s * 2, 2.0)
                last_error = type(exc).__name__
                continue
            _log.info("idempotency_settled", action=what, after_s=round(waited_s, 2))
            if what == "release":
                self.hook.released()
            return
        _log.warning("idempotency_settle_gave_up", action=what, error=last_error)

    @property
    def settling(self) -> int:
        """Releases/completions still waiting for the store (tests and operators)."""
        return len(self._settling)

    async def _replay(self, response: StoredResponse, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in response.headers
        ]
        headers.append((b"content-length", str(len(response.body)).encode("latin-1")))
        headers.append((b"idempotent-replayed", b"true"))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": False})

    @staticmethod
    async def _problem(
        kind: _ProblemKind,
        detail: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        response = problem_response(
            status=kind.status,
            slug=kind.slug,
            title=kind.title,
            detail=detail,
            instance=scope["path"],
            request_id=request_id_var.get(),
            headers=headers,
        )
        await response(scope, receive, send)
