"""`ResilientHttpClient`: httpx.AsyncClient calls under a dependency's `ResiliencePolicy`."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import httpx

from mercato.kit.resilience.deadline import DEADLINE_HEADER, current_deadline
from mercato.kit.resilience.policy import ResiliencePolicy

__all__ = ["IDEMPOTENCY_KEY_HEADER", "IDEMPOTENT_METHODS", "ResilientHttpClient"]

# RFC 9110 §9.2.2. POST and PATCH become retryable only with an Idempotency-Key.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
_HEDGEABLE_METHODS = frozenset({"GET", "HEAD"})


class ResilientHttpClient:
    """Every request gets the policy: per-attempt timeout, `X-Request-Deadline`, retries, breaker, bulkhead.

    - Retries only when the method is idempotent or the caller sent an `Idempotency-Key` (the server
      then dedups); `idempotent=` overrides either way.
    - Breaker classification: 5xx, timeouts and transport errors are failures; 4xx are successes (the
      dependency is healthy and said no; tripping on them would let one bad client open the circuit
      for everybody).
    - Retried statuses: `retry_statuses` (502, 503, 504 by default: gateway/unavailable/timeout, the
      transient ones; a 500 is usually a deterministic bug and retrying it is wasted load). After the
      last attempt the response is returned, not raised, as httpx does.
    - The deadline header and the httpx timeout are computed per attempt from the attempt's own deadline
      (the tighter of the request deadline and the per-attempt timeout), so the dependency never works
      longer than we will wait.
    - GET/HEAD are hedged when `hedge_reads` is set and the policy has a `HedgeConfig`.

    Request bodies must be re-sendable (bytes, str, json, data): a streamed body cannot be retried.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        policy: ResiliencePolicy,
        retry_statuses: Collection[int] = (502, 503, 504),
        hedge_reads: bool = False,
    ) -> None:
        self._client = client
        self.policy = policy
        self._retry_statuses = frozenset(retry_statuses)
        self._hedge_reads = hedge_reads

    async def request(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        idempotent: bool | None = None,
        hedge: bool | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        method = method.upper()
        base_headers = httpx.Headers(headers)
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS or IDEMPOTENCY_KEY_HEADER in base_headers
        if hedge is None:
            hedge = self._hedge_reads and method in _HEDGEABLE_METHODS

        async def send() -> httpx.Response:
            attempt_headers = base_headers.copy()
            timeout: httpx.Timeout | None = None
            deadline = current_deadline()
            if deadline is not None:
                attempt_headers[DEADLINE_HEADER] = deadline.to_header()
                timeout = httpx.Timeout(max(deadline.remaining_s(), 0.001))
            if timeout is None:
                return await self._client.request(method, url, headers=attempt_headers, **kwargs)
            return await self._client.request(method, url, headers=attempt_headers, timeout=timeout, **kwargs)

        return await self.policy.call(
            send,
            idempotent=idempotent,
            hedge=hedge,
            result_is_failure=_is_server_error,
            retry_on_result=self._is_retryable_response,
            extra_retry_on=(httpx.TransportError,),
        )

    async def get(self, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", url, **kwargs)

    async def head(self, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        return await self.request("HEAD", url, **kwargs)

    async def post(self, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", url, **kwargs)

    async def put(self, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        return await self.request("PUT", url, **kwargs)

    async def patch(self, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        return await self.request("PATCH", url, **kwargs)

    async def delete(self, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        return await self.request("DELETE", url, **kwargs)

    def _is_retryable_response(self, response: httpx.Response) -> bool:
        return response.status_code in self._retry_statuses


def _is_server_error(response: httpx.Response) -> bool:
    return response.status_code >= 500
