"""What both thin clients share: explicit timeouts, problem+json errors, per-call Idempotency-Key."""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["DEFAULT_LIMITS", "DEFAULT_TIMEOUT", "ProviderError", "ProviderHttpClient"]

# Explicit and short: the saga's resilience layer decides about retries, deadlines and breakers.
DEFAULT_TIMEOUT = httpx.Timeout(connect=1.0, read=5.0, write=5.0, pool=1.0)
# One keep-alive pool per client (guide §28: reuse saves a TCP handshake per call). Idle connections
# expire under the providers' 5 s keep-alive timeout (uvicorn's default), so a request is never sent
# on a connection the server is closing at that moment.
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=4.0)


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


class ProviderHttpClient:
    """An `httpx.AsyncClient` owner; transport errors (timeouts, dropped connections) pass through as
    `httpx` exceptions, so callers can tell "no answer" (outcome unknown) from a refusal."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        limits: httpx.Limits = DEFAULT_LIMITS,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, limits=limits, transport=transport, headers=headers
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(
        self, path: str, *, idempotency_key: str, json: dict[str, Any] | None = None
    ) -> httpx.Response:
        response = await self._http.post(path, json=json or {}, headers={"Idempotency-Key": idempotency_key})
        _raise_for_problem(response)
        return response

    async def _get(self, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        response = await self._http.get(
            path, params={k: v for k, v in (params or {}).items() if v is not None}
        )
        _raise_for_problem(response)
        return response


def _raise_for_problem(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        problem = response.json()
    except ValueError:
        problem = {"title": response.text[:200]}
    raise ProviderError(response.status_code, problem if isinstance(problem, dict) else {})
