"""A database that cannot be reached (the seconds of a failover) is a 503 + Retry-After at the edge,
never a 500: for a read, a write, and a checkout whose Idempotency-Key claim needs the database."""

from __future__ import annotations

import uuid

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mercato.bootstrap import build_container
from mercato.cluster import free_port
from mercato.gateway.app import create_app
from tests.conftest import make_settings


@pytest.mark.parametrize(
    ("method", "path", "extra"),
    [
        ("GET", "/v1/orders", {}),
        ("DELETE", "/v1/carts/me", {}),
        ("POST", "/v1/checkout", {"json": {}, "headers": {"Idempotency-Key": "unavailable-1"}}),
        ("POST", "/v1/auth/login", {"json": {"email": "a@example.com", "password": "long-enough-pass"}}),
    ],
)
async def test_unreachable_database_is_503_with_retry_after(method: str, path: str, extra: dict) -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nowhere"  # nothing listens there
    settings = make_settings(url)
    container = build_container(settings)
    app = create_app(settings, container=container, configure_logs=False)
    # No account and no signing key can be read (nothing listens): a well-formed EdDSA token makes
    # the process reach for its keys and the token's account, and meet the same outage.
    token = jwt.encode(
        {"sub": str(uuid.uuid4()), "iss": "mercato", "aud": "mercato-api", "exp": 4102444800},
        Ed25519PrivateKey.generate(),
        algorithm="EdDSA",
        headers={"kid": "not-loaded-yet"},
    )
    auth = {"authorization": f"Bearer {token}"}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {**auth, **extra.pop("headers", {})}
            response = await client.request(method, path, headers=headers, **extra)
    finally:
        await container.close()
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["type"].endswith("/dependency-unavailable")
