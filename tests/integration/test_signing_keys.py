"""Access-token signing keys shared through the database (ADR 0036), on both engines: rotation with
overlap, forged and retired `kid`s refused with 401, the JWKS, a second process catching up within
its reload bound, and `mercato keys rotate|list`."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta

import httpx
import jwt
import pytest
from cryptography.exceptions import InvalidTag
from pydantic import SecretStr
from sqlalchemy import select
from typer.testing import CliRunner

from mercato.bootstrap import Container, build_container
from mercato.cli.main import app as cli
from mercato.config import get_settings
from mercato.gateway.app import create_app
from mercato.kit.auth import InvalidToken, Principal
from mercato.kit.auth.keys import SigningKey
from mercato.kit.clock import ManualClock
from mercato.shop.identity.tables import signing_keys
from tests.conftest import TEST_SECRET
from tests.integration.shop_support import account, api

PASSWORD = "correct horse battery staple"


async def _login(client: httpx.AsyncClient, email: str) -> str:
    registered = await client.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
    assert registered.status_code == 201, registered.text
    login = await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    return str(login.json()["access_token"])


def _kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _long_lived(container: Container, key: SigningKey, subject: str) -> str:
    """A token signed by `key` whose own `exp` is far away: only the key's retirement can refuse it."""
    assert key.private is not None
    now = int(container.clock.now().timestamp())
    settings = container.settings.auth
    claims = {
        "sub": subject,
        "iss": settings.issuer,
        "aud": settings.audience,
        "iat": now,
        "nbf": now,
        "exp": now + 10 * 3600,
        "jti": "leaked-key-token",
        "roles": ["customer"],
        "scope": "",
    }
    return jwt.encode(claims, key.private, algorithm="EdDSA", headers={"kid": key.kid})


async def test_rotation_overlap_then_refusal(container: Container, clock: ManualClock) -> None:
    store = container.signing_keys
    assert store is not None
    async with api(container) as client:
        old_token = await _login(client, "rotate@example.com")
        old_signer = store.ring.signer()
        assert old_signer is not None
        assert _kid(old_token) == old_signer.kid
        subject = container.token_codec.verify(old_token).subject
        leaked = _long_lived(container, old_signer, subject)

        new_key = await store.rotate()
        login = await client.post(
            "/v1/auth/login", json={"email": "rotate@example.com", "password": PASSWORD}
        )
        new_token = str(login.json()["access_token"])
        assert _kid(new_token) == new_key.kid != old_signer.kid

        # During the overlap both keys verify.
        for token in (old_token, new_token, leaked):
            assert (await client.get("/v1/me", headers=_bearer(token))).status_code == 200

        # Past retired_at + access TTL + reload bound, the old key verifies nothing, whatever `exp` says.
        overlap = container.settings.auth.access_ttl_s + container.settings.auth.signing_key_reload_s
        clock.advance(overlap - 10)
        assert (await client.get("/v1/me", headers=_bearer(leaked))).status_code == 200
        clock.advance(11)
        refused = await client.get("/v1/me", headers=_bearer(leaked))
        assert refused.status_code == 401
        assert refused.headers["content-type"].startswith("application/problem+json")
        with pytest.raises(InvalidToken, match="unknown or retired"):
            container.token_codec.verify(leaked)
        # The new key still signs and verifies.
        fresh = await client.post(
            "/v1/auth/login", json={"email": "rotate@example.com", "password": PASSWORD}
        )
        fresh_token = str(fresh.json()["access_token"])
        assert _kid(fresh_token) == new_key.kid
        assert (await client.get("/v1/me", headers=_bearer(fresh_token))).status_code == 200


async def test_forged_kid_and_alg_confusion_are_401(container: Container) -> None:
    async with api(container) as client:
        token = await _login(client, "forger@example.com")
        claims = jwt.decode(token, options={"verify_signature": False})
        # A key of the attacker's own, under a kid we never issued, and under our current kid.
        stranger = SigningKey.generate(generation=1, now=container.clock.now())
        assert stranger.private is not None
        signer = container.signing_keys.ring.signer() if container.signing_keys else None
        assert signer is not None
        forgeries = [
            jwt.encode(claims, stranger.private, algorithm="EdDSA", headers={"kid": stranger.kid}),
            jwt.encode(claims, stranger.private, algorithm="EdDSA", headers={"kid": signer.kid}),
            jwt.encode(claims, signer.public_bytes(), algorithm="HS256", headers={"kid": signer.kid}),
            jwt.encode(claims, None, algorithm="none", headers={"kid": signer.kid}),  # type: ignore[arg-type]
        ]
        for forged in forgeries:
            response = await client.get("/v1/me", headers=_bearer(forged))
            assert response.status_code == 401, forged
            assert response.headers["content-type"].startswith("application/problem+json")


async def test_jwks_lists_exactly_the_verifying_public_keys(container: Container, clock: ManualClock) -> None:
    store = container.signing_keys
    assert store is not None
    async with api(container) as client:
        first = await client.get("/.well-known/jwks.json")
        assert first.status_code == 200
        assert first.headers["content-type"].startswith("application/jwk-set+json")
        assert first.headers["cache-control"] == "public, max-age=30"
        old = store.ring.signer()
        assert old is not None
        assert first.json() == {"keys": [old.jwk()]}

        new = await store.rotate()
        both = (await client.get("/.well-known/jwks.json")).json()["keys"]
        assert [k["kid"] for k in both] == [new.kid, old.kid]
        for jwk in both:
            assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}  # never "d"
            assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("OKP", "Ed25519", "EdDSA")

        # A token verifies with nothing but the published key (what a third party does).
        token = await _login(client, "jwks@example.com")
        published = jwt.PyJWKSet.from_dict({"keys": both})[_kid(token)]
        settings = container.settings.auth
        claims = jwt.decode(
            token,
            published.key,
            algorithms=["EdDSA"],
            audience=settings.audience,
            issuer=settings.issuer,
            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},  # a test clock
        )
        assert claims["jti"]

        clock.advance(settings.access_ttl_s + settings.signing_key_reload_s + 1)
        assert (await client.get("/.well-known/jwks.json")).json() == {"keys": [new.jwk()]}


async def test_keys_are_stored_sealed(container: Container) -> None:
    store = container.signing_keys
    assert store is not None
    signer = store.ring.signer()
    assert signer is not None
    async with container.db.read() as conn:
        row = (await conn.execute(select(signing_keys))).mappings().one()
    assert row["kid"] == signer.kid
    assert signer.private_bytes() not in row["sealed_private_key"]
    # Another deployment's secret cannot open them.
    settings = container.settings
    other_auth = settings.auth.model_copy(update={"secret": SecretStr("x" * 48)})
    other = build_container(settings.model_copy(update={"auth": other_auth}), clock=container.clock)
    try:
        assert other.signing_keys is not None
        with pytest.raises(InvalidTag):
            await other.signing_keys.reload()
    finally:
        await other.close()


async def test_second_process_verifies_a_rotation_within_its_reload_bound(
    container: Container, clock: ManualClock
) -> None:
    """Process B (its own container and app, lifespan running) sees A's rotation within reload_s."""
    reload_s = 0.5
    auth_b = container.settings.auth.model_copy(update={"signing_key_reload_s": reload_s})
    settings_b = container.settings.model_copy(update={"auth": auth_b})
    process_b = build_container(settings_b, clock=clock)
    app_b = create_app(settings_b, container=process_b, configure_logs=False)
    subject = str(await account(container))
    async with app_b.router.lifespan_context(app_b):  # B loads the keys and starts its reloader
        assert process_b.signing_keys is not None
        assert container.signing_keys is not None
        before = container.signing_keys.ring.signer()
        assert before is not None
        b_signer = process_b.signing_keys.ring.signer()
        assert b_signer is not None
        assert b_signer.kid == before.kid  # the same key, from the database, not one of its own

        new_key = await container.signing_keys.rotate()  # in process A
        token = container.token_codec.issue(Principal(subject, frozenset({"customer"}))).token
        assert _kid(token) == new_key.kid
        started = time.monotonic()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app_b), base_url="http://b") as b:
            while (await b.get("/v1/me", headers=_bearer(token))).status_code != 200:
                assert time.monotonic() - started < reload_s + 2.0, "B never learnt the new key"
                await asyncio.sleep(0.05)
        assert process_b.signing_keys.ring.signer() is not None
        assert process_b.signing_keys.ring.signer().kid == new_key.kid  # type: ignore[union-attr]


def test_cli_rotate_and_list(container: Container, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    monkeypatch.setenv("MERCATO_DATABASE_URL", container.settings.database.url)
    monkeypatch.setenv("MERCATO_AUTH_SECRET", TEST_SECRET)
    monkeypatch.setenv("MERCATO_ENV", "test")
    get_settings.cache_clear()
    try:
        assert container.signing_keys is not None
        first = container.signing_keys.ring.signer()
        assert first is not None
        listed = runner.invoke(cli, ["keys", "list", "--json"])
        assert listed.exit_code == 0, listed.output
        assert [(k["kid"], k["state"]) for k in json.loads(listed.stdout)] == [(first.kid, "signing")]

        rotated = runner.invoke(cli, ["keys", "rotate", "--json"])
        assert rotated.exit_code == 0, rotated.output
        keys = json.loads(rotated.stdout)
        assert [k["state"] for k in keys] == ["signing", "verifying"]
        assert keys[1]["kid"] == first.kid
        assert keys[0]["kid"] != first.kid
        retired_at = keys[1]["retired_at"]
        assert retired_at is not None
        overlap = timedelta(
            seconds=container.settings.auth.access_ttl_s + container.settings.auth.signing_key_reload_s
        )
        assert (
            datetime.fromisoformat(keys[1]["verifies_until"]) == datetime.fromisoformat(retired_at) + overlap
        )
        assert keys[0]["verifies_until"] is None
        table = runner.invoke(cli, ["keys", "list"])
        assert table.exit_code == 0
        assert keys[0]["kid"][:8] in table.stdout
    finally:
        get_settings.cache_clear()
