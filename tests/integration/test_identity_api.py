"""The identity routes through the real app (in-process ASGI) on both backends."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest

from mercato.bootstrap import Container
from mercato.gateway.app import create_app
from mercato.kit.auth import Principal, TokenCodec
from mercato.kit.auth.keys import KeyRing, SigningKey
from mercato.kit.clock import ManualClock
from mercato.shop.identity.contracts import Role

PASSWORD = "correct horse battery"
PRODUCT = {"sku": "ID-0001", "name": "Lamp", "price_minor": 1999, "currency": "EUR", "category": "home"}


@pytest.fixture
async def client(container: Container) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(container.settings, container=container, configure_logs=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


async def _register(client: httpx.AsyncClient, email: str = "ada@example.com") -> httpx.Response:
    return await client.post("/v1/auth/register", json={"email": email, "password": PASSWORD})


async def _login(client: httpx.AsyncClient, email: str = "ada@example.com") -> dict[str, Any]:
    response = await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_unauthenticated(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_register_login_me(client: httpx.AsyncClient) -> None:
    created = await client.post(
        "/v1/auth/register", json={"email": "Ada@Example.com", "password": PASSWORD, "display_name": "Ada"}
    )
    assert created.status_code == 201
    assert created.headers["location"] == "/v1/me"
    assert created.json()["role"] == "customer"
    tokens = await _login(client)
    assert set(tokens) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert tokens["token_type"] == "bearer"
    assert 0 < tokens["expires_in"] <= 900
    me = await client.get("/v1/me", headers=_bearer(tokens["access_token"]))
    assert me.status_code == 200
    assert "no-store" in me.headers["cache-control"]
    body = me.json()
    assert body["email"] == "ada@example.com"
    assert body["display_name"] == "Ada"
    assert body["id"] == created.json()["id"]
    assert body["scopes"] == ["cart:read", "cart:write", "orders:read", "orders:write"]
    assert not any("hash" in key or "password" in key for key in body)
    assert "argon2" not in me.text


async def test_duplicate_email_is_409_whatever_the_case(client: httpx.AsyncClient) -> None:
    assert (await _register(client)).status_code == 201
    again = await _register(client, "ADA@example.COM")
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    assert again.json()["type"] == "/problems/email-taken"


async def test_weak_password_is_400_naming_the_field(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/auth/register", json={"email": "ada@example.com", "password": "short"})
    assert response.status_code == 400
    assert [e["field"] for e in response.json()["errors"]] == ["body.password"]


async def test_bad_email_and_unknown_fields_are_400(client: httpx.AsyncClient) -> None:
    """The e-mail rule is in the schema (a pattern), so breaking it breaks the contract: 400."""
    for email in ("not-an-email", "a" * 65 + "@example.com", "ada@localhost"):
        bad = await client.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
        assert bad.status_code == 400, email
        assert bad.json()["type"] == "/problems/validation-error"
        assert [e["field"] for e in bad.json()["errors"]] == ["body.email"]
    extra = await client.post(
        "/v1/auth/register", json={"email": "ada@example.com", "password": PASSWORD, "role": "admin"}
    )
    assert extra.status_code == 400


async def test_unknown_email_and_wrong_password_are_indistinguishable(client: httpx.AsyncClient) -> None:
    await _register(client)
    unknown = await client.post("/v1/auth/login", json={"email": "nobody@example.com", "password": PASSWORD})
    wrong = await client.post("/v1/auth/login", json={"email": "ada@example.com", "password": "wrong pass!"})
    for response in (unknown, wrong):
        _assert_unauthenticated(response)
    keys = ("status", "type", "title", "detail")
    assert {k: unknown.json()[k] for k in keys} == {k: wrong.json()[k] for k in keys}
    assert unknown.json()["type"] == "/problems/invalid-credentials"


async def test_refresh_rotates_and_the_old_token_stops_working(client: httpx.AsyncClient) -> None:
    await _register(client)
    first = await _login(client)
    rotated = await client.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert rotated.status_code == 200
    second = rotated.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert (await client.get("/v1/me", headers=_bearer(second["access_token"]))).status_code == 200
    reused = await client.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    _assert_unauthenticated(reused)
    assert reused.json()["type"] == "/problems/invalid-refresh-token"


async def test_reuse_of_a_rotated_token_revokes_the_newest_too(client: httpx.AsyncClient) -> None:
    await _register(client)
    first = await _login(client)
    second = (await client.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})).json()
    third = (await client.post("/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})).json()
    _assert_unauthenticated(
        await client.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    )
    _assert_unauthenticated(
        await client.post("/v1/auth/refresh", json={"refresh_token": third["refresh_token"]})
    )


async def test_logout_revokes_the_login(client: httpx.AsyncClient) -> None:
    await _register(client)
    tokens = await _login(client)
    out = await client.post("/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    assert out.status_code == 204
    assert out.content == b""
    _assert_unauthenticated(
        await client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    )
    assert (await client.post("/v1/auth/logout", json={"refresh_token": "unknown"})).status_code == 204


async def test_concurrent_refresh_with_one_token_succeeds_once(client: httpx.AsyncClient) -> None:
    await _register(client)
    tokens = await _login(client)
    responses = await asyncio.gather(
        *(client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}) for _ in range(4))
    )
    assert sorted(r.status_code for r in responses) == [200, 401, 401, 401]


async def test_me_without_or_with_a_bad_token_is_401(client: httpx.AsyncClient, container: Container) -> None:
    _assert_unauthenticated(await client.get("/v1/me"))
    _assert_unauthenticated(await client.get("/v1/me", headers=_bearer("not-a-jwt")))
    await _register(client)
    token = (await _login(client))["access_token"]

    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin"]
    claims["scope"] = "catalog:write users:write"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    _assert_unauthenticated(await client.get("/v1/me", headers=_bearer(f"{header}.{forged}.{signature}")))

    unsigned = jwt.encode(claims, key=None, algorithm="none")  # type: ignore[arg-type]
    _assert_unauthenticated(await client.get("/v1/me", headers=_bearer(unsigned)))

    # Another deployment's key, under the kid of ours that signs.
    assert container.signing_keys is not None
    ours = container.signing_keys.ring.signer()
    assert ours is not None
    theirs = SigningKey.generate(generation=1, now=container.clock.now())
    impostor = SigningKey(
        kid=ours.kid, generation=1, public=theirs.public, private=theirs.private, created_at=ours.created_at
    )
    other_key = TokenCodec(
        keys=KeyRing((impostor,), overlap_s=930),
        issuer=container.settings.auth.issuer,
        audience=container.settings.auth.audience,
        access_ttl_s=900,
        clock=container.clock,
    ).issue(Principal(claims["sub"], frozenset({"admin"}), frozenset({"catalog:write"})))
    _assert_unauthenticated(await client.get("/v1/me", headers=_bearer(other_key.token)))


async def test_expired_access_token_is_401(client: httpx.AsyncClient, clock: ManualClock) -> None:
    await _register(client)
    tokens = await _login(client)
    assert (await client.get("/v1/me", headers=_bearer(tokens["access_token"]))).status_code == 200
    clock.advance(tokens["expires_in"] + 60)
    _assert_unauthenticated(await client.get("/v1/me", headers=_bearer(tokens["access_token"])))
    # The refresh token outlives the access token: that is what it is for.
    renewed = await client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert renewed.status_code == 200
    assert (await client.get("/v1/me", headers=_bearer(renewed.json()["access_token"]))).status_code == 200


async def test_disabled_account_token_is_refused_on_me(
    client: httpx.AsyncClient, container: Container
) -> None:
    created = (await _register(client)).json()
    tokens = await _login(client)
    user = await container.identity.find_by_email("ada@example.com")
    assert user is not None
    assert str(user.id) == created["id"]
    await container.identity.set_disabled(user.id, disabled=True)
    refused = await client.get("/v1/me", headers=_bearer(tokens["access_token"]))
    _assert_unauthenticated(refused)
    # Refused by the bearer guard, like any token whose subject is gone (ADR 0027).
    assert refused.json()["type"] == "/problems/unauthenticated"


async def test_customer_is_403_and_admin_is_201_on_an_admin_route(
    client: httpx.AsyncClient, container: Container
) -> None:
    await _register(client)
    customer = await _login(client)
    forbidden = await client.post("/v1/products", json=PRODUCT, headers=_bearer(customer["access_token"]))
    assert forbidden.status_code == 403
    assert forbidden.headers["content-type"] == "application/problem+json"

    await container.identity.create_user("boss@example.com", PASSWORD, role=Role.ADMIN)
    admin = await _login(client, "boss@example.com")
    created = await client.post("/v1/products", json=PRODUCT, headers=_bearer(admin["access_token"]))
    assert created.status_code == 201, created.text


async def test_openapi_documents_every_identity_status(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    expected = {
        ("/v1/auth/register", "post"): {"201", "409", "422"},
        ("/v1/auth/login", "post"): {"200", "401", "422"},
        ("/v1/auth/refresh", "post"): {"200", "401", "422"},
        ("/v1/auth/logout", "post"): {"204", "422"},
        ("/v1/me", "get"): {"200", "401"},
    }
    for (path, method), statuses in expected.items():
        assert statuses <= set(paths[path][method]["responses"]), (path, method)
    assert "password_hash" not in json.dumps(paths)
