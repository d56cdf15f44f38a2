"""What both thin clients share: explicit timeouts, a keep-alive pool, problem+json errors, and a
per-call Idempotency-Key.

The transport is aiohttp, not httpx (ADR 0022): on this kind of VM each write on a loopback socket
costs the writer ~100–170 µs of CPU (the kernel delivers and wakes the reader inside the call), and
httpx writes a request in four pieces where aiohttp writes it in one; measured, 1.7–2.1 ms against
0.28 ms of client CPU per POST. The saga makes three of these calls per checkout.

With several base URLs (instances of one provider) and a `kit.balancing.Balancer`, each request goes
to the endpoint the balancer picks, and its outcome (answer, 5xx, no answer) feeds the balancer's
outlier ejection (ADR 0039): a retry by the caller's policy then lands on another instance.

Every request carries the time its caller has left as `X-Request-Deadline` (remaining milliseconds,
from the current deadline scope the resilience policy opens per attempt), so the provider stops
working on a call nobody waits for any more; without a scope, no header is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from mercato.kit.balancing import Balancer, Lease, Outcome
from mercato.kit.observability import trace_carrier, tracer
from mercato.kit.resilience import outgoing_deadline_headers

__all__ = [
    "DEFAULT_POOL",
    "DEFAULT_TIMEOUT",
    "ProviderError",
    "ProviderHttpClient",
    "ProviderPool",
    "ProviderResponse",
    "ProviderTimeout",
    "ProviderUnavailable",
]


@dataclass(frozen=True, slots=True)
class ProviderTimeout:
    """Explicit and short: the saga's resilience layer decides about retries, deadlines and breakers.

    `connect_s` bounds waiting for a pooled connection plus opening a new one; `read_s` bounds each
    wait for the answer's bytes (a hung provider is cut there, or earlier by the policy's timeout).
    """

    read_s: float = 5.0
    connect_s: float = 1.0


@dataclass(frozen=True, slots=True)
class ProviderPool:
    """One keep-alive pool per client (guide §28: reuse saves a TCP handshake per call).

    Idle connections are closed after `keepalive_expiry_s`, kept under the providers' 5 s keep-alive
    timeout (uvicorn's default) so a request is never sent on a connection the server is closing.
    `keepalive_expiry_s == 0` opens a connection per call.
    """

    max_connections: int = 100
    keepalive_expiry_s: float = 4.0


DEFAULT_TIMEOUT = ProviderTimeout()
DEFAULT_POOL = ProviderPool()


class ProviderError(Exception):
    """The provider answered with a problem (4xx/5xx); `status` and the problem `slug` say which."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.slug = str(problem.get("type", "")).rsplit("/", 1)[-1]
        super().__init__(f"{status} {self.slug}: {problem.get('detail') or problem.get('title', '')}")

    @property
    def retryable(self) -> bool:
        """5xx and 409 in-flight may succeed later with the same key; other 4xx will not."""
        return self.status >= 500 or self.slug == "idempotency-key-in-flight"


class ProviderUnavailable(ConnectionError):
    """No answer (refused, reset, timed out, dropped mid-response): the outcome of a write is unknown,
    so only a retry with the same Idempotency-Key is safe. A `ConnectionError`, so generic retry and
    breaker rules treat it as the transport failure it is."""


@dataclass(frozen=True, slots=True)
class ProviderResponse:
    status_code: int
    content: bytes

    def json(self) -> Any:
        return orjson.loads(self.content)


class ProviderHttpClient:
    """An aiohttp session owner, opened lazily in the caller's event loop."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        timeout: ProviderTimeout = DEFAULT_TIMEOUT,
        pool: ProviderPool = DEFAULT_POOL,
        headers: dict[str, str] | None = None,
        balancer: Balancer | None = None,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("a provider client needs a base URL")
        self._base_url = urls[0].rstrip("/")
        # Several instances: a balancer over them (the caller's, or least outstanding by default).
        if balancer is None and len(urls) > 1:
            balancer = Balancer([u.rstrip("/") for u in urls])
        self.balancer = balancer
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout.connect_s, sock_connect=timeout.connect_s, sock_read=timeout.read_s
        )
        self._pool = pool
        self._headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None

    @property
    def base_url(self) -> str:
        return self._base_url

    @base_url.setter
    def base_url(self, value: str) -> None:
        """Repointed at run time by the runtime configuration's discovery section (ADR 0045)."""
        self._base_url = value.rstrip("/")

    def _open(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            reuse = self._pool.keepalive_expiry_s > 0
            connector = aiohttp.TCPConnector(
                limit=self._pool.max_connections,
                keepalive_timeout=self._pool.keepalive_expiry_s if reuse else None,
                force_close=not reuse,
                # Lookups of 127.0.0.1 and service names would otherwise go through a thread per call.
                use_dns_cache=True,
            )
            session = self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers=self._headers,
                json_serialize=lambda value: orjson.dumps(value).decode(),
            )
        return session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def _post(
        self, path: str, *, idempotency_key: str, json: dict[str, Any] | None = None
    ) -> ProviderResponse:
        return await self._send("POST", path, json=json or {}, headers={"Idempotency-Key": idempotency_key})

    async def _get(self, path: str, params: dict[str, Any] | None = None) -> ProviderResponse:
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        return await self._send("GET", path, params=query)

    async def _send(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> ProviderResponse:
        deadline = outgoing_deadline_headers()
        if deadline:
            headers = {**(headers or {}), **deadline}
        if not trace.get_current_span().get_span_context().is_valid:
            return await self._exchange(method, path, headers, kwargs)
        # A client span whose context travels as `traceparent`: the provider's server span is its child.
        url = self._base_url + path
        with tracer().start_as_current_span(
            f"{method} {_operation(path)}",
            kind=SpanKind.CLIENT,
            attributes={"http.request.method": method, "url.full": url, "server.address": self._base_url},
            record_exception=False,
        ) as span:
            try:
                answer = await self._exchange(method, path, {**(headers or {}), **trace_carrier()}, kwargs)
            except ProviderError as exc:
                span.set_attribute("http.response.status_code", exc.status)
                span.set_status(Status(StatusCode.ERROR, exc.slug))
                raise
            except ProviderUnavailable as exc:
                span.set_attribute("error.type", type(exc.__cause__).__name__)
                span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
                raise
            span.set_attribute("http.response.status_code", answer.status_code)
            return answer

    async def _exchange(
        self, method: str, path: str, headers: dict[str, str] | None, kwargs: dict[str, Any]
    ) -> ProviderResponse:
        lease: Lease | None = self.balancer.acquire() if self.balancer is not None else None
        base = lease.endpoint if lease is not None else self._base_url
        try:
            async with self._open().request(method, base + path, headers=headers, **kwargs) as response:
                answer = ProviderResponse(response.status, await response.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            if lease is not None:
                lease.release(Outcome.LOCAL_FAILURE)
            raise ProviderUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        except BaseException:  # cancelled by the caller's per-attempt timeout: no answer in time
            if lease is not None:
                lease.release(Outcome.LOCAL_FAILURE)
            raise
        if lease is not None:
            lease.release(Outcome.SERVER_ERROR if answer.status_code >= 500 else Outcome.SUCCESS)
        _raise_for_problem(answer)
        return answer


def _operation(path: str) -> str:
    """The route a path names without its ids (`/v1/payments/pay_1/capture` -> `/v1/payments/{id}/capture`),
    so span names stay few."""
    parts = path.split("?", 1)[0].split("/")
    return "/".join(p if i < 3 or not any(c.isdigit() for c in p) else "{id}" for i, p in enumerate(parts))


def _raise_for_problem(response: ProviderResponse) -> None:
    if response.status_code < 400:
        return
    try:
        problem = response.json()
    except ValueError:
        problem = {"title": response.content[:200].decode(errors="replace")}
    raise ProviderError(response.status_code, problem if isinstance(problem, dict) else {})
