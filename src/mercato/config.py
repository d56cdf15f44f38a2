"""Typed settings: the only module that reads the environment.

Every setting is `MERCATO_<SECTION>_<NAME>` (nested sections use `__` in pydantic-settings
terms, flattened here to one underscore per section by explicit aliases) or a TOML file named
by `MERCATO_CONFIG_FILE`.
"""

from __future__ import annotations

import os
import tomllib
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from mercato.providers.config import ProviderSettings

DEFAULT_AUTH_SECRET = "dev-only-insecure-secret-change-me-0123456789"  # noqa: S105 - refused outside dev


class Environment(StrEnum):
    DEV = "dev"
    TEST = "test"
    PROD = "prod"


class DatabaseSettings(BaseModel):
    url: str = "sqlite+aiosqlite:///./var/mercato.db"
    pool_size: int = Field(default=10, ge=1, le=200)
    max_overflow: int = Field(default=10, ge=0, le=200)
    pool_timeout_s: float = Field(default=5.0, gt=0)
    statement_timeout_s: float = Field(default=10.0, gt=0)
    echo: bool = False

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


class AuthSettings(BaseModel):
    secret: SecretStr = SecretStr(DEFAULT_AUTH_SECRET)
    issuer: str = "mercato"
    audience: str = "mercato-api"
    access_ttl_s: int = Field(default=900, ge=30, le=900)
    refresh_ttl_s: int = Field(default=14 * 24 * 3600, ge=60)
    # argon2id cost: RFC 9106's second recommended option scaled for an API server.
    argon2_time_cost: int = Field(default=3, ge=1)
    argon2_memory_kib: int = Field(default=65536, ge=8)
    argon2_parallelism: int = Field(default=1, ge=1)


class HttpSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    workers: int = Field(default=1, ge=1, le=64)
    access_log: bool = False


class TelemetrySettings(BaseModel):
    log_level: str = "info"
    log_format: str = "json"  # json | console
    trace_exporter: str = "none"  # none | console | otlp | memory
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    service_name: str = "mercato"


class SeedSettings(BaseModel):
    products: int = Field(default=1200, ge=0, le=1_000_000)
    customers: int = Field(default=3, ge=0, le=1000)
    random_seed: int = 42
    admin_email: str = "admin@mercato.local"
    admin_password: SecretStr = SecretStr("admin-password-123")
    # When true, /startupz reports "starting" until the demo data is in (set by `mercato up`).
    required: bool = False


class ShopSettings(BaseModel):
    max_quantity_per_line: int = Field(default=99, ge=1)
    max_cart_lines: int = Field(default=50, ge=1)
    reservation_ttl_s: int = Field(default=900, ge=1)


class CheckoutSettings(BaseModel):
    # A checkout not finished by then compensates instead (every order reaches a terminal state).
    saga_deadline_s: float = Field(default=120.0, gt=0)
    # Per attempt; the PSP's p99 plus margin (guide: "timeouts near p95 of dependency + margin").
    provider_timeout_s: float = Field(default=3.0, gt=0)
    provider_attempts: int = Field(default=4, ge=1, le=20)
    saga_concurrency: int = Field(default=32, ge=1, le=1000)
    saga_lease_s: float = Field(default=30.0, gt=0)


class MessagingSettings(BaseModel):
    partitions: int = Field(default=8, ge=1, le=1024)
    visibility_timeout_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, le=100)
    relay_interval_s: float = Field(default=0.2, gt=0)
    relay_batch: int = Field(default=200, ge=1, le=10_000)


class IdempotencySettings(BaseModel):
    ttl_s: int = Field(default=86_400, ge=60)
    # Above the slowest request a client would still wait for, or a retry could run it twice.
    lock_timeout_s: float = Field(default=60.0, gt=0)
    purge_interval_s: float = Field(default=300.0, gt=0)


class WorkerSettings(BaseModel):
    # How often expired inventory reservations give their units back.
    reservation_sweep_s: float = Field(default=5.0, gt=0, le=3600)
    # Each run handles at most this many, so one sweep never holds the write lock for long.
    reservation_sweep_batch: int = Field(default=500, ge=1, le=100_000)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MERCATO_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="ignore",
        case_sensitive=False,
    )

    env: Environment = Environment.DEV
    data_dir: Path = Path("./var")
    database: DatabaseSettings = DatabaseSettings()
    auth: AuthSettings = AuthSettings()
    http: HttpSettings = HttpSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    seed: SeedSettings = SeedSettings()
    shop: ShopSettings = ShopSettings()
    worker: WorkerSettings = WorkerSettings()
    idempotency: IdempotencySettings = IdempotencySettings()
    providers: ProviderSettings = ProviderSettings()
    checkout: CheckoutSettings = CheckoutSettings()
    messaging: MessagingSettings = MessagingSettings()

    @field_validator("env", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlFileSource(settings_cls))

    @model_validator(mode="after")
    def _providers_share_the_data_dir(self) -> Settings:
        if "data_dir" not in self.providers.model_fields_set:
            self.providers.data_dir = self.data_dir
        return self

    def check_safe_to_start(self) -> None:
        """Refuse configurations that are unsafe outside development."""
        if self.env is not Environment.DEV and self.env is not Environment.TEST:
            if self.auth.secret.get_secret_value() == DEFAULT_AUTH_SECRET:
                raise UnsafeConfiguration(
                    "MERCATO_AUTH_SECRET is the built-in development secret; "
                    "set a strong secret before running with MERCATO_ENV=" + self.env.value
                )
            if len(self.auth.secret.get_secret_value()) < 32:
                raise UnsafeConfiguration("MERCATO_AUTH_SECRET must be at least 32 characters")

    def masked(self) -> dict[str, Any]:
        """The effective configuration with secrets masked (for `mercato config show`)."""
        data = self.model_dump(mode="json")
        data["auth"]["secret"] = "********"  # noqa: S105 - the mask itself
        data["seed"]["admin_password"] = "********"  # noqa: S105 - the mask itself
        data["database"]["url"] = _mask_url(self.database.url)
        return data


class UnsafeConfiguration(RuntimeError):
    """The configuration must not be used to start the service."""


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads the TOML file named by MERCATO_CONFIG_FILE, below environment variables."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data().get(field_name), field_name, False

    def _data(self) -> dict[str, Any]:
        path = os.environ.get("MERCATO_CONFIG_FILE")
        if not path:
            return {}
        with open(path, "rb") as fh:
            return tomllib.load(fh)

    def __call__(self) -> dict[str, Any]:
        return self._data()


def _mask_url(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:****@{host}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
