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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from mercato.config.sections import (
    ChatSettings as ChatSettings,
)
from mercato.config.sections import (
    CoordinationSettings as CoordinationSettings,
)
from mercato.config.sections import (
    NetworkSettings as NetworkSettings,
)
from mercato.config.sections import (
    ProcessPoolSettings as ProcessPoolSettings,
)
from mercato.config.sections import (
    RealtimeSettings as RealtimeSettings,
)
from mercato.config.sections import (
    ReleaseSettings as ReleaseSettings,
)
from mercato.config.sections import (
    WorkerSettings as WorkerSettings,
)
from mercato.config.sections import (
    split_list,
)
from mercato.providers.config import ProviderSettings

DEFAULT_AUTH_SECRET = "dev-only-insecure-secret-change-me-0123456789"  # noqa: S105 - refused outside dev


class Environment(StrEnum):
    DEV = "dev"
    TEST = "test"
    PROD = "prod"


class DatabaseSettings(BaseModel):
    url: str = "sqlite+aiosqlite:///./var/mercato.db"
    # Every connection the pool opens is kept (ADR 0084): an overflow connection is closed at check-in
    # whenever `pool_size` others are idle, so a process whose concurrency hovers around `pool_size`
    # reopens connections all the time, each a backend fork, asyncpg's type introspection and every
    # statement prepared again (measured at 100 checkouts/s: ~5 new sessions a second with 10 + 10).
    # The ceiling is the same 20 as before.
    pool_size: int = Field(default=20, ge=1, le=200)
    max_overflow: int = Field(default=0, ge=0, le=200)
    pool_timeout_s: float = Field(default=5.0, gt=0)
    statement_timeout_s: float = Field(default=10.0, gt=0)
    echo: bool = False
    # SQLite only: what a commit survives (ADR 0058). NORMAL: a process crash (no fsync per commit;
    # a power loss or an OS crash may lose the last commits, never corrupt the file). FULL: also a
    # power loss, for one fsync of the WAL per commit (what PostgreSQL's default gives).
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    # Read replicas (PostgreSQL): reads whose use case accepts staleness go to one of these (ADR 0032).
    # NoDecode: the environment gives a comma list, not only JSON.
    replica_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # A replica lagging more than this leaves read routing (and /readyz lists it) until it catches up.
    replica_max_lag_s: float = Field(default=5.0, gt=0)
    # How long a read with a consistency token waits for a replica to replay it before the primary
    # serves it instead.
    replica_token_wait_s: float = Field(default=0.05, ge=0, le=5)
    # PostgreSQL: the primary is probed this often on a connection of its own (0: off); after
    # `probe_failures` probes unanswered within `probe_timeout_s` it is unreachable (a partition):
    # reads of the primary and writes answer 503 at once, stuck statements are ended (docs/consistency.md).
    probe_interval_s: float = Field(default=0.25, ge=0, le=60)
    probe_timeout_s: float = Field(default=0.5, gt=0, le=60)
    probe_failures: int = Field(default=2, ge=1, le=100)

    @field_validator("replica_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        return split_list(value)

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
    # Staleness bounds of each process's view of shared access state (ADR 0027): a logout made in
    # another process, a deleted account, a revoked API key are honoured within these.
    revocation_sync_s: float = Field(default=1.0, ge=0, le=60)
    subject_cache_s: float = Field(default=5.0, ge=0, le=300)
    api_key_cache_s: float = Field(default=5.0, ge=0, le=300)
    # Every process reloads the access-token signing keys this often (ADR 0036): a rotation made
    # elsewhere is verified here within it; retired keys verify for access_ttl_s plus this.
    signing_key_reload_s: float = Field(default=30.0, gt=0, le=300)


class PrivacySettings(BaseModel):
    """Personal data at rest (ADR 0052). The master secret wraps each customer's data key; unset, it
    is derived from the auth secret (a separate one lets the two be rotated apart). The keyring
    (wrapped keys) lives in the shop's database unless `keyring_url` names its own: kept apart,
    the shop database's backups hold no key and an erasure survives their restore."""

    master_secret: SecretStr | None = None
    keyring_url: str | None = None
    # Staff actions are kept this long (the audit log's database triggers enforce the same 400 days).
    audit_retention_days: int = Field(default=400, ge=400)
    # Rendered notifications (personal to their recipient) once sent or failed.
    notifications_kept_days: int = Field(default=90, ge=1)


class HttpSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # The whole body must arrive within this many seconds of the first read, or the request gets 408
    # and the connection closes: a client that declares 50 MB and sends 2 bytes holds no worker long.
    body_read_timeout_s: float = Field(default=10.0, gt=0, le=600)
    workers: int = Field(default=1, ge=1, le=64)
    access_log: bool = False
    # Connection draining (ADR 0040): on SIGTERM /readyz answers 503 for this long before the server
    # stops accepting; keep it above the balancer's fall × check interval (HAProxy harness: 2 × 0.5 s).
    drain_s: float = Field(default=2.0, ge=0, le=300)
    # Lab fault switch (gateway/faults.py): every request but the probes waits this long. Dev/test only.
    fault_delay_ms: float = Field(default=0.0, ge=0, le=60_000)


class TelemetrySettings(BaseModel):
    log_level: str = "info"
    log_format: str = "json"  # json | console
    trace_exporter: str = "none"  # none | console | otlp | memory
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    service_name: str = "mercato"


class _TelemetryEnvironment(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MERCATO_", env_nested_delimiter="_", env_nested_max_split=1, extra="ignore"
    )
    telemetry: TelemetrySettings = TelemetrySettings()


def telemetry_settings() -> TelemetrySettings:
    """`MERCATO_TELEMETRY_*` alone, for processes that read no other setting (the simulators)."""
    return _TelemetryEnvironment().telemetry


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
    # Provider calls go through a resilience policy per dependency (breaker, bulkhead, timeouts,
    # budgeted retries); `MERCATO_CHECKOUT_RESILIENCE=off` leaves only the saga's step retries
    # (the baseline `mercato lab breaker` compares against).
    resilience: bool = True
    # The providers' observed p95: the per-attempt timeout is p95 + 25 % (capped by
    # provider_timeout_s, the whole call's budget, which sits inside the saga step's timeout).
    provider_p95_s: float = Field(default=0.8, gt=0)
    provider_max_concurrent: int = Field(default=64, ge=1, le=10_000)
    # The providers' breakers (ADR 0021): trip on the window's rates once minimum_calls were made, or
    # on consecutive_failures in a row (0: off); open breaker_open_s, doubled per failed probe up to
    # breaker_max_open_s; half_open_probes calls in flight while half-open.
    breaker_minimum_calls: int = Field(default=20, ge=1)
    breaker_consecutive_failures: int = Field(default=8, ge=0)
    breaker_window_s: float = Field(default=10.0, gt=0)
    breaker_open_s: float = Field(default=5.0, ge=0)
    breaker_max_open_s: float = Field(default=30.0, ge=0)
    breaker_half_open_probes: int = Field(default=1, ge=1, le=100)


class MessagingSettings(BaseModel):
    # Stream backend: "sql" (the embedded log in the app's database: `mercato up` needs no server),
    # "redis" (Redis Streams at `redis_url`) or "nats" (NATS JetStream at `nats_url`).
    backend: Literal["sql", "redis", "nats"] = "sql"
    redis_url: str = "redis://127.0.0.1:6379/0"
    nats_url: str = "nats://127.0.0.1:4222"  # several servers of one cluster: comma-separated
    # JetStream replication factor of the streams and buckets we create (3 on a 3-node cluster).
    nats_replicas: int = Field(default=1, ge=1, le=5)
    # Key prefix (Redis) / stream-name prefix (NATS): several deployments can share one server.
    broker_prefix: str = Field(default="mercato", pattern=r"^[A-Za-z0-9_-]+$")
    # How long a broker remembers a published message id for dedup (outbox republish window).
    dedup_window_s: int = Field(default=86_400, ge=60)
    partitions: int = Field(default=8, ge=1, le=1024)
    visibility_timeout_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, le=100)
    # Wake on work (kit/storage/signals.py): the outbox relay, the stream consumers, the projectors
    # and the saga runner wait for a signal of new work and poll only this often, as a safety net
    # (a missed signal, a process that cannot signal this one, a lease that expired elsewhere).
    relay_interval_s: float = Field(default=5.0, gt=0, le=60)
    relay_batch: int = Field(default=200, ge=1, le=10_000)
    # Retention (ADR 0023), applied by the worker's purge/trim jobs every `retention_interval_s`,
    # at most `retention_batch` rows per statement. Published outbox rows are only history.
    retention_interval_s: float = Field(default=300.0, gt=0)
    retention_batch: int = Field(default=1000, ge=1, le=100_000)
    outbox_retention_s: int = Field(default=86_400, ge=60)
    # Inbox dedup records must outlive any redelivery or replay of their message: one replayed after
    # its record is gone is applied again. So at least the stream's retention when that is set.
    inbox_retention_s: int = Field(default=7 * 86_400, ge=60)
    # Stream entries older than this are trimmed, never below the slowest consumer group. Unset: the
    # stream keeps everything, because `mercato projections rebuild` replays it from offset zero.
    stream_retention_s: int | None = Field(default=None, ge=60)

    @model_validator(mode="after")
    def _inbox_outlives_the_stream(self) -> MessagingSettings:
        if self.stream_retention_s is not None and self.inbox_retention_s < self.stream_retention_s:
            raise ValueError(
                "inbox_retention_s must be at least stream_retention_s (replays would apply twice)"
            )
        return self


class IdempotencySettings(BaseModel):
    ttl_s: int = Field(default=86_400, ge=60)
    # Above the slowest request a client would still wait for, or a retry could run it twice.
    lock_timeout_s: float = Field(default=60.0, gt=0)
    purge_interval_s: float = Field(default=300.0, gt=0)


class BackpressureSettings(BaseModel):
    """The per-process load shedder (ADR 'load shedding'); `enabled=false` serves everything it gets."""

    enabled: bool = True
    # Little's law: capacity (req/s) x the latency we accept (s). ~2 000/s x ~30 ms on one worker.
    max_inflight: int = Field(default=64, ge=1, le=100_000)
    # Fractions of max_inflight each class may fill; the rest is headroom for the classes above.
    normal_share: float = Field(default=0.85, gt=0, le=1)
    sheddable_share: float = Field(default=0.6, gt=0, le=1)
    queue_size: int = Field(default=16, ge=0, le=10_000)
    # Under 5 ms so a refusal is still "fast"; critical work (checkout, probes) may wait longer.
    queue_timeout_ms: float = Field(default=4.0, ge=0, le=1000)
    critical_queue_timeout_ms: float = Field(default=100.0, ge=0, le=10_000)
    retry_after_s: int = Field(default=1, ge=1, le=3600)

    @model_validator(mode="after")
    def _shares_ordered(self) -> BackpressureSettings:
        if self.sheddable_share > self.normal_share:
            raise ValueError("sheddable_share must not exceed normal_share")
        return self


class EdgeCacheSettings(BaseModel):
    """Cache-Control lifetimes for public catalog reads (a CDN or reverse proxy may store them)."""

    product_max_age_s: int = Field(default=60, ge=0, le=86_400)
    product_stale_while_revalidate_s: int = Field(default=300, ge=0, le=86_400)
    list_max_age_s: int = Field(default=15, ge=0, le=86_400)
    list_stale_while_revalidate_s: int = Field(default=60, ge=0, le=86_400)


class CacheSettings(BaseModel):
    """The application cache of public catalog reads (kit/cache, ADR 0034/0035).

    `backend`: `memory` (per process), `redis` (a shared Redis tier behind each process's memory
    tier, invalidations broadcast on pub/sub), or `auto`: `redis` when Redis is configured for the
    stream or the rate limiter, else `memory`. Env: `MERCATO_CACHE_BACKEND=redis`.
    `local_fresh_s` bounds how long a process trusts its own copy (the staleness bound if an
    invalidation message is lost); `memory_max_bytes` bounds the in-process tier.
    """

    enabled: bool = True
    backend: Literal["auto", "memory", "redis"] = "auto"
    redis_url: str | None = None  # None: the stream's or the rate limiter's Redis
    key_prefix: str = "mercato:cache"
    policy: Literal["lru", "tinylfu"] = "tinylfu"
    memory_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=16 * 1024**3)
    fresh_s: float = Field(default=300.0, gt=0, le=86_400)
    local_fresh_s: float = Field(default=30.0, gt=0, le=86_400)
    stale_while_revalidate_s: float = Field(default=30.0, ge=0, le=86_400)
    stale_if_error_s: float = Field(default=600.0, ge=0, le=86_400)
    negative_s: float = Field(default=5.0, ge=0, le=3600)


DEFAULT_SIGNING_KEY = "dev-only-insecure-url-signing-key-change-me-0123456789"


class SigningSettings(BaseModel):
    """Keys for signed media URLs. The current key signs; every listed key verifies (rotation).

    Env: `MERCATO_SIGNING_KEYS='{"k2": "...", "k1": "..."}'`, `MERCATO_SIGNING_CURRENT_KID=k2`.
    """

    keys: dict[str, SecretStr] = Field(default_factory=lambda: {"dev": SecretStr(DEFAULT_SIGNING_KEY)})
    current_kid: str = "dev"
    url_ttl_s: int = Field(default=3600, ge=60, le=7 * 86_400)
    # Expiries are rounded up to this, so one URL (one CDN object) serves everyone in a window.
    url_granularity_s: int = Field(default=300, ge=1, le=86_400)

    @model_validator(mode="after")
    def _current_is_known(self) -> SigningSettings:
        if self.current_kid not in self.keys:
            raise ValueError(f"current_kid {self.current_kid!r} is not among the signing keys")
        return self


class RateLimitSettings(BaseModel):
    """The edge limiter (ADR 0010). Rules live in `policy_file` (TOML, re-read when it changes);
    `backend` is the store for rules that do not name one: `memory` (per process) or `redis` (shared)."""

    enabled: bool = True
    policy_file: Path | None = None  # None: the policies shipped in mercato/gateway/ratelimit.toml
    reload_interval_s: float = Field(default=2.0, ge=0, le=3600)
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "mercato:rl:"
    api_key_header: str = "X-API-Key"
    tenant_header: str = "X-Tenant-ID"
    # A limiter is on every request's path: a slow Redis costs at most this, then the breaker opens.
    socket_timeout_s: float = Field(default=0.1, gt=0, le=5)
    timeout_s: float = Field(default=0.25, gt=0, le=5)
    failure_threshold: int = Field(default=5, ge=1, le=1000)
    reset_timeout_s: float = Field(default=5.0, gt=0, le=600)


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
    backpressure: BackpressureSettings = BackpressureSettings()
    edge_cache: EdgeCacheSettings = EdgeCacheSettings()
    cache: CacheSettings = CacheSettings()
    signing: SigningSettings = SigningSettings()
    ratelimit: RateLimitSettings = RateLimitSettings()
    network: NetworkSettings = NetworkSettings()
    realtime: RealtimeSettings = RealtimeSettings()
    privacy: PrivacySettings = PrivacySettings()
    chat: ChatSettings = ChatSettings()
    release: ReleaseSettings = ReleaseSettings()
    coordination: CoordinationSettings = CoordinationSettings()
    processes: ProcessPoolSettings = ProcessPoolSettings()

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
            if self.release.inject_error_ratio > 0:
                raise UnsafeConfiguration("MERCATO_RELEASE_INJECT_ERROR_RATIO is for labs (dev/test) only")
            if self.auth.secret.get_secret_value() == DEFAULT_AUTH_SECRET:
                raise UnsafeConfiguration(
                    "MERCATO_AUTH_SECRET is the built-in development secret; "
                    "set a strong secret before running with MERCATO_ENV=" + self.env.value
                )
            if self.http.fault_delay_ms > 0:
                raise UnsafeConfiguration("MERCATO_HTTP_FAULT_DELAY_MS is a lab fault switch: dev/test only")
            if len(self.auth.secret.get_secret_value()) < 32:
                raise UnsafeConfiguration("MERCATO_AUTH_SECRET must be at least 32 characters")
            for kid, key in self.signing.keys.items():
                if key.get_secret_value() == DEFAULT_SIGNING_KEY or len(key.get_secret_value()) < 32:
                    raise UnsafeConfiguration(
                        f"signing key {kid!r} is the development key or shorter than 32 characters; "
                        "set MERCATO_SIGNING_KEYS before running with MERCATO_ENV=" + self.env.value
                    )

    def masked(self) -> dict[str, Any]:
        """The effective configuration with secrets masked (for `mercato config show`)."""
        data = self.model_dump(mode="json")
        data["auth"]["secret"] = "********"  # noqa: S105 - the mask itself
        data["seed"]["admin_password"] = "********"  # noqa: S105 - the mask itself
        data["database"]["url"] = _mask_url(self.database.url)
        data["ratelimit"]["redis_url"] = _mask_url(self.ratelimit.redis_url)
        if self.cache.redis_url:
            data["cache"]["redis_url"] = _mask_url(self.cache.redis_url)
        if self.privacy.master_secret is not None:
            data["privacy"]["master_secret"] = "********"  # noqa: S105 - the mask itself
        if self.privacy.keyring_url:
            data["privacy"]["keyring_url"] = _mask_url(self.privacy.keyring_url)
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
