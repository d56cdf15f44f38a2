"""The edge, hardened (issue 12 §3): anonymous and sign-up limits per address, real API keys, access
tokens revoked at logout in every process, tokens of vanished accounts refused, customers reading
their own payment ledgers, public availability, staff-only routes marked in OpenAPI."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from sqlalchemy import delete, select

from mercato.bootstrap import Container, build_container
from mercato.gateway.app import create_app
from mercato.kit.clock import ManualClock
from mercato.kit.messaging import SqlLogStream
from mercato.shop.identity.tables import api_keys, revoked_tokens, users
from tests.conftest import TEST_SECRET, make_settings
from tests.integration.shop_support import admin, api, customer, product
from tests.integration.test_payments import paid_and_refunded

PASSWORD = "correct horse battery staple"


@asynccontextmanager
async def client_at(container: Container, ip: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        make_settings(container.settings.database.url), container=container, configure_logs=False
    )
    transport = httpx.ASGITransport(app=app, client=(ip, 4242))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


async def _login(http: httpx.AsyncClient, email: str) -> dict[str, str]:
    assert (
        await http.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
    ).status_code == 201
    tokens = await http.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert tokens.status_code == 200, tokens.text
    return dict(tokens.json())


def _bearer(tokens: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def test_anonymous_reads_are_limited_per_address_not_for_signed_in_callers(
    container: Container,
) -> None:
    async with client_at(container, "198.51.100.10") as http:
        tokens = await _login(http, "reader@example.com")
        statuses = [(await http.get("/v1/products")).status_code for _ in range(260)]
        assert statuses[:150].count(200) == 150
        assert 429 in statuses  # burst 200 (+ refill): 260 back to back cannot all pass
        refused = await http.get("/v1/products")
        assert refused.status_code == 429
        assert refused.json()["rule"] == "anonymous-ip"
        assert int(refused.headers["retry-after"]) >= 1
        # The same address signed in is no longer anonymous traffic.
        assert (await http.get("/v1/products", headers=_bearer(tokens))).status_code == 200
    async with client_at(container, "198.51.100.11") as other:  # another address: its own bucket
        assert (await other.get("/v1/products")).status_code == 200


async def test_sign_ups_are_limited_per_address(container: Container) -> None:
    async with client_at(container, "198.51.100.20") as http:
        statuses = [
            (await http.post("/v1/auth/register", json={"email": f"u{i}@example.com", "password": PASSWORD}))
            for i in range(22)
        ]
    codes = [r.status_code for r in statuses]
    assert codes[:20] == [201] * 20
    assert codes[20:] == [429, 429]
    assert statuses[-1].json()["rule"] == "register-ip"
    assert await container.identity.count() == 20


async def test_api_keys_are_issued_hashed_scoped_and_revocable(container: Container) -> None:
    staff = await admin(container)
    await product(container, "KEY-1", 100)
    await container.inventory.set_available("KEY-1", 7)
    async with client_at(container, "198.51.100.30") as http:
        _, shopper = await customer(container)
        assert (await http.post("/admin/api-keys", json={"name": "x"}, headers=shopper)).status_code == 403
        created = await http.post(
            "/admin/api-keys", json={"name": "warehouse", "scopes": ["inventory:read"]}, headers=staff
        )
        assert created.status_code == 201, created.text
        secret = created.json()["key"]
        key_id = created.json()["id"]
        assert created.headers["location"] == f"/admin/api-keys/{key_id}"
        refused = await http.post(
            "/admin/api-keys", json={"name": "root", "scopes": ["users:write"]}, headers=staff
        )
        assert refused.status_code == 422

        # Stored as a keyed hash only: neither the key nor its plain SHA-256.
        async with container.db.read() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == uuid.UUID(key_id)))).one()
        assert secret not in str(tuple(row))
        assert row.key_hash != hashlib.sha256(secret.encode()).hexdigest()
        hash_key = hmac.new(TEST_SECRET.encode(), b"mercato api-key hashing v1", hashlib.sha256).digest()
        assert row.key_hash == hmac.new(hash_key, secret.encode(), hashlib.sha256).hexdigest()

        listed = (await http.get("/admin/api-keys", headers=staff)).json()["items"]
        assert [(k["id"], k["scopes"]) for k in listed] == [(key_id, ["inventory:read"])]
        assert "key" not in listed[0]
        assert secret not in str(listed)

        key = {"X-API-Key": secret}
        stock = await http.get("/v1/inventory/KEY-1", headers=key)
        assert stock.status_code == 200, stock.text  # the key's scope, no bearer token
        assert stock.headers["ratelimit-limit"] == "200"  # its own per-key bucket (rule `api-key`)
        assert (await http.put("/v1/inventory/KEY-1", json={"available": 1}, headers=key)).status_code == 403

        unknown = await http.get("/v1/products", headers={"X-API-Key": "mk_00000000_made-up"})
        assert unknown.status_code == 401
        assert unknown.headers["content-type"].startswith("application/problem+json")

        revoked = await http.post(f"/admin/api-keys/{key_id}/revoke", headers=staff)
        assert revoked.status_code == 200
        assert revoked.json()["revoked_at"] is not None
        assert (await http.get("/v1/inventory/KEY-1", headers=key)).status_code == 401
        assert (await http.post(f"/admin/api-keys/{uuid.uuid4()}/revoke", headers=staff)).status_code == 404


async def test_rotating_made_up_keys_buys_no_fresh_bucket(container: Container) -> None:
    async with client_at(container, "198.51.100.40") as http:
        codes = [
            (await http.get("/v1/products", headers={"X-API-Key": f"mk_{i:08x}_guess"})).status_code
            for i in range(230)
        ]
    assert codes[0] == 401
    assert 429 in codes  # each made-up key was charged to the address as anonymous traffic
    assert set(codes) == {401, 429}


async def test_logout_revokes_the_access_token_in_every_process(
    container: Container, database_url: str, clock: ManualClock
) -> None:
    other = build_container(make_settings(database_url), clock=clock)  # a second API process
    try:
        async with client_at(container, "198.51.100.50") as http, client_at(other, "198.51.100.50") as far:
            tokens = await _login(http, "leaver@example.com")
            assert (await far.get("/v1/carts/me", headers=_bearer(tokens))).status_code == 200
            out = await http.post(
                "/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]}, headers=_bearer(tokens)
            )
            assert out.status_code == 204
            for route in ("/v1/carts/me", "/v1/me", "/v1/orders"):
                response = await http.get(route, headers=_bearer(tokens))
                assert response.status_code == 401, (route, response.text)
                assert response.headers["www-authenticate"].lower().startswith("bearer")
            # The other process catches up within its sync interval (1 s by default).
            clock.advance(1.5)
            assert (await far.get("/v1/carts/me", headers=_bearer(tokens))).status_code == 401
    finally:
        await other.close()
    async with container.db.read() as conn:
        assert len((await conn.execute(select(revoked_tokens))).all()) == 1
    clock.advance(container.settings.auth.access_ttl_s + 10)  # the token has expired on its own
    assert container.sessions is not None
    assert await container.sessions.purge_expired() == 1


async def test_a_deleted_accounts_token_is_refused_on_every_route(
    container: Container, clock: ManualClock
) -> None:
    async with client_at(container, "198.51.100.60") as http:
        tokens = await _login(http, "gone@example.com")
        assert (await http.get("/v1/carts/me", headers=_bearer(tokens))).status_code == 200
        gone = await container.identity.find_by_email("gone@example.com")
        assert gone is not None
        async with container.db.write() as conn:
            await conn.execute(delete(users).where(users.c.id == gone.id))
        clock.advance(container.settings.auth.subject_cache_s + 0.5)
        for route in ("/v1/carts/me", "/v1/me", "/v1/orders", "/v1/order-summaries"):
            assert (await http.get(route, headers=_bearer(tokens))).status_code == 401, route


async def test_customers_read_their_own_payment_ledger_only(container: Container, clock: ManualClock) -> None:
    await product(container, "PAY-1", 2_500)
    owner, owner_headers = await customer(container)
    _, stranger = await customer(container)
    await container.cart.set_item(owner, "PAY-1", 1)
    order = await container.checkout.start(owner, correlation_id=str(uuid.uuid4()))
    stream = SqlLogStream(container.db, partitions=1, clock=clock)
    await stream.publish(paid_and_refunded(str(order.id)))
    await container.payments.consumer(stream).run_once()
    async with api(container) as http:
        mine = await http.get(f"/v1/payments/{order.id}", headers=owner_headers)
        assert mine.status_code == 200, mine.text
        assert mine.json()["captured_minor"] == 2_500
        theirs = await http.get(f"/v1/payments/{order.id}", headers=stranger)
        assert theirs.status_code == 404
        staff = await http.get(f"/v1/payments/{order.id}", headers=await admin(container))
        assert staff.status_code == 200
        assert (await http.get(f"/v1/payments/{order.id}")).status_code == 401


async def test_availability_is_public_and_staff_routes_say_so_in_openapi(container: Container) -> None:
    await product(container, "AVAIL-1", 100)
    await container.inventory.set_available("AVAIL-1", 3)
    async with api(container) as http:
        available = await http.get("/v1/inventory/AVAIL-1/availability")
        assert available.status_code == 200, available.text
        assert available.json() == {"sku": "AVAIL-1", "available": 3, "in_stock": True}
        unknown = await http.get("/v1/inventory/NOPE-1/availability")
        assert unknown.json() == {"sku": "NOPE-1", "available": 0, "in_stock": False}
        assert (await http.get("/v1/inventory/AVAIL-1")).status_code == 401  # stock levels: staff
        schema = (await http.get("/openapi.json")).json()
    stock = schema["paths"]["/v1/inventory/{sku}"]["get"]
    assert stock["x-staff-only"] is True
    assert "staff" in stock["tags"]
    assert stock["description"].startswith("**Staff only**")
    assert {"HTTPBearer": []} in stock["security"]
    assert {"ApiKeyHeader": []} in stock["security"]
    for path, method in (("/admin/api-keys", "post"), ("/admin/sagas", "get"), ("/v1/products", "post")):
        assert schema["paths"][path][method].get("x-staff-only") is True, path
    for path, method in (("/v1/payments/{order_id}", "get"), ("/v1/orders/{order_id}", "get")):
        assert "x-staff-only" not in schema["paths"][path][method], path
    assert "security" not in schema["paths"]["/v1/inventory/{sku}/availability"]["get"]


async def test_partners_behind_one_address_do_not_share_idempotency_keys(container: Container) -> None:
    await product(container, "IDEM-1", 100)
    await container.inventory.set_available("IDEM-1", 10)
    assert container.api_keys is not None
    first = (await container.api_keys.create("a", ["inventory:write"])).secret
    second = (await container.api_keys.create("b", ["inventory:write"])).secret
    async with client_at(container, "198.51.100.70") as http:
        answers = [
            await http.post(
                "/v1/inventory/reservations",
                json={"reference": f"ref-{n}", "lines": [{"sku": "IDEM-1", "quantity": 1}]},
                headers={"X-API-Key": secret, "Idempotency-Key": "same-key"},
            )
            for n, secret in enumerate((first, second))
        ]
    # Scoped per key, not per address: the second partner's request is its own, not a mismatch (422)
    # nor a replay of the first partner's reservation.
    assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
    assert answers[1].json()["reference"] == "ref-1"


async def test_a_subject_lookup_is_one_autocommitted_driver_statement(
    container: Container, clock: ManualClock
) -> None:
    from mercato.kit.auth import InvalidToken, Principal
    from tests.integration.statement_budget import counting

    guard = container.sessions
    assert guard is not None
    user_id, _ = await customer(container)
    principal = Principal(subject=str(user_id), token_id="t-1")
    await guard.admit(principal)  # the revocation list's first sync, then the subject
    clock.advance(container.settings.auth.subject_cache_s + 0.5)
    with counting(container) as lookup:
        await guard.admit(principal)
    # Was a `Database.read()`: BEGIN, the SELECT and ROLLBACK through SQLAlchemy.
    assert [sql.split()[:2] for sql in lookup.statements if "identity_users" in sql] == [
        ["driver:", "SELECT"]
    ], lookup.report()
    # Besides it, only the revocation list's periodic sync (its interval passed too).
    others = [sql for sql in lookup.statements if not sql.startswith("driver:")]
    assert all("identity_revoked_tokens" in sql for sql in others), lookup.report()
    async with container.db.write() as conn:
        await conn.execute(users.update().where(users.c.id == user_id).values(disabled=True))
    clock.advance(container.settings.auth.subject_cache_s + 0.5)
    try:
        await guard.admit(principal)
    except InvalidToken:
        pass
    else:
        raise AssertionError("a disabled account's token was admitted")
