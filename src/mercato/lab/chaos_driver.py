"""The chaos run's customers: log in, fill the cart, `POST /v1/checkout` with an Idempotency-Key, retried
with the same key as a real client would (transport errors, 5xx, 409 in flight, a lost 202)."""

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from mercato.lab.chaos_invariants import (
    CheckoutAttempt,
)
from mercato.lab.chaos_model import CUSTOMER_PASSWORD, ChaosConfig


def _retryable(response: httpx.Response) -> bool:
    """5xx (a shed or failed request) and 429 (rate limited) may succeed later."""
    return response.status_code >= 500 or response.status_code == 429


def _backoff_s(attempt: int, response: httpx.Response | None) -> float:
    """Honour Retry-After (capped: the run has a budget), else exponential from 50 ms."""
    header = response.headers.get("retry-after") if response is not None else None
    if header is not None and header.isdigit():
        return min(float(header), 5.0)
    return min(2.0, 0.05 * 2.0**attempt)


@dataclass
class Driver:
    """Drives checkouts over HTTP as `concurrency` customers, each one checkout at a time."""

    base_url: str
    config: ChaosConfig
    skus: list[str]
    rng: random.Random
    attempts: list[CheckoutAttempt] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)

    async def run(self, emails: list[str], on_done: Callable[[], None]) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(self.config.checkouts):
            queue.put_nowait(n)
        started = time.monotonic()
        spacing_s = self.config.drive_s / max(self.config.checkouts, 1)
        limits = httpx.Limits(max_connections=self.config.concurrency * 2)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10.0, limits=limits) as client:

            async def customer(email: str) -> None:
                token = await self._login(client, email)
                while True:
                    try:
                        n = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    # Arrivals are paced so checkouts keep starting while the worker is killed.
                    await asyncio.sleep(max(0.0, started + n * spacing_s - time.monotonic()))
                    attempt = await self._checkout(client, token, n)
                    if attempt is None:  # the token expired: log in again and retry this one
                        token = await self._login(client, email)
                        attempt = await self._checkout(client, token, n)
                    if attempt is not None:
                        self.attempts.append(attempt)
                    on_done()

            await asyncio.gather(*(customer(email) for email in emails))

    async def _request(
        self, client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
    ) -> httpx.Response:
        """Transport errors and 5xx are retried: these calls (login, cart edits) are idempotent."""
        for attempt in range(10):
            try:
                response = await client.request(method, url, **kwargs)
            except httpx.TransportError:
                self.stats["transport_errors"] += 1
            else:
                if not _retryable(response):
                    return response
                self.stats[f"status_{response.status_code}"] += 1
                await asyncio.sleep(_backoff_s(attempt, response))
                continue
            await asyncio.sleep(_backoff_s(attempt, None))
        raise RuntimeError(f"{method} {url} kept failing")

    async def _login(self, client: httpx.AsyncClient, email: str) -> str:
        response = await self._request(
            client, "POST", "/v1/auth/login", json={"email": email, "password": CUSTOMER_PASSWORD}
        )
        if response.status_code != 200:
            raise RuntimeError(f"login failed: {response.status_code} {response.text}")
        return str(response.json()["access_token"])

    async def _checkout(self, client: httpx.AsyncClient, token: str, n: int) -> CheckoutAttempt | None:
        auth = {"Authorization": f"Bearer {token}"}
        cleared = await self._request(client, "DELETE", "/v1/carts/me", headers=auth)
        if cleared.status_code == 401:
            return None
        for sku in self.rng.sample(
            self.skus, self.rng.randint(1, min(self.config.max_lines, len(self.skus)))
        ):
            put = await self._request(
                client,
                "PUT",
                f"/v1/carts/me/items/{sku}",
                json={"quantity": self.rng.randint(1, self.config.max_quantity)},
                headers=auth,
            )
            if put.status_code != 200:
                raise RuntimeError(f"cart line refused: {put.status_code} {put.text}")
        body = {"card_token": "tok_decline"} if self.rng.random() < self.config.decline_share else {}
        key = f"chaos-{n}-{uuid.uuid4().hex}"
        headers = {**auth, "Idempotency-Key": key}
        order_ids: list[str] = []
        answered = False
        posts = 0
        resend = self.rng.random() < self.config.resend_share
        for attempt in range(12):
            posts += 1
            try:
                response = await client.post("/v1/checkout", json=body, headers=headers)
            except httpx.TransportError:
                self.stats["checkout_transport_errors"] += 1
                await asyncio.sleep(_backoff_s(attempt, None))
                continue
            if response.status_code == 202:
                answered = True
                order_ids.append(str(response.json()["order_id"]))
                if response.headers.get("idempotent-replayed") == "true":
                    self.stats["replayed"] += 1
                if resend:  # the same key again: must replay the same order, never make a second
                    resend = False
                    self.stats["resent"] += 1
                    continue
                break
            if _retryable(response) or response.status_code == 409:  # 409: the first is in flight
                self.stats[f"checkout_{response.status_code}"] += 1
                await asyncio.sleep(_backoff_s(attempt, response))
                continue
            if response.status_code == 401:
                return None
            answered = True
            self.stats[f"checkout_{response.status_code}"] += 1
            break
        return CheckoutAttempt(key=key, order_ids=tuple(order_ids), answered=answered, posts=posts)
