from __future__ import annotations

import pytest
from pydantic import SecretStr

from mercato.config import AuthSettings, Environment, Settings, SigningSettings, UnsafeConfiguration


def test_env_vars_map_to_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERCATO_DATABASE_URL", "postgresql+asyncpg://u:pw@db:5432/shop")
    monkeypatch.setenv("MERCATO_AUTH_ACCESS_TTL_S", "600")
    monkeypatch.setenv("MERCATO_SEED_PRODUCTS", "10")
    settings = Settings()
    assert settings.database.url.endswith("/shop")
    assert settings.auth.access_ttl_s == 600
    assert settings.seed.products == 10


def test_access_tokens_cannot_outlive_fifteen_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERCATO_AUTH_ACCESS_TTL_S", "3600")
    with pytest.raises(ValueError):
        Settings()


def test_production_refuses_the_default_secret() -> None:
    with pytest.raises(UnsafeConfiguration):
        Settings(env=Environment.PROD).check_safe_to_start()
    Settings(env=Environment.DEV).check_safe_to_start()
    strong = AuthSettings(secret=SecretStr("s" * 48))
    # The media-URL signing key is refused the same way while it is the development default.
    with pytest.raises(UnsafeConfiguration, match="signing key"):
        Settings(env=Environment.PROD, auth=strong).check_safe_to_start()
    signing = SigningSettings(keys={"k1": SecretStr("k" * 48)}, current_kid="k1")
    Settings(env=Environment.PROD, auth=strong, signing=signing).check_safe_to_start()


def test_masked_config_hides_secrets_and_passwords_in_urls() -> None:
    settings = Settings(auth=AuthSettings(secret=SecretStr("x" * 40)))
    settings.database.url = "postgresql+asyncpg://shop:hunter2@db:5432/shop"
    masked = settings.masked()
    assert "hunter2" not in str(masked)
    assert "x" * 40 not in str(masked)


def test_toml_file_is_read_below_environment(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "mercato.toml"
    path.write_text("[http]\nport = 9100\n[seed]\nproducts = 7\n")
    monkeypatch.setenv("MERCATO_CONFIG_FILE", str(path))
    monkeypatch.setenv("MERCATO_SEED_PRODUCTS", "8")
    settings = Settings()
    assert settings.http.port == 9100
    assert settings.seed.products == 8
