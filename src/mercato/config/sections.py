"""Settings sections of the distributed machinery (network, worker, coordination, real time, chat
shards, releases): plain typed models, read through `Settings` in `__init__.py` (the only place
that reads the environment)."""

from __future__ import annotations

import ipaddress
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import NoDecode


def split_list(value: Any) -> Any:
    """A list setting from the environment: a JSON list, or comma-separated values."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        return json.loads(value)
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class NetworkSettings(BaseModel):
    """How the service sits on the network (ADR 0019, guide §28).

    `trusted_proxies`: addresses or CIDRs of the reverse proxies / CDN edges in front of the API. Only
    when the socket peer is one of them is `forwarded_header` read, walked from the right, to find the
    client (rate limits, logs). Empty, the default, trusts nobody: the client is the socket peer.
    Env: `MERCATO_NETWORK_TRUSTED_PROXIES='10.0.0.0/8,192.168.1.5'` (or a JSON list).
    `forwarded_header` must be the one header the proxies write: one they pass through untouched is
    the client's to forge.

    `client_*`: the keep-alive pool of each outgoing HTTP client (the payment provider, the carrier).
    The idle expiry stays under the servers' keep-alive timeout (uvicorn: 5 s), so the client never
    sends on a connection the server is closing.
    """

    # NoDecode: the environment gives a comma list (the validator splits it), not only JSON.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    client_max_connections: int = Field(default=100, ge=1, le=10_000)
    client_max_keepalive_connections: int = Field(default=20, ge=0, le=10_000)
    client_keepalive_expiry_s: float = Field(default=4.0, ge=0, le=600)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"trusted_proxies: not an IP address or CIDR: {entry!r}") from exc
        return [entry.strip() for entry in value]


class WorkerSettings(BaseModel):
    # How often expired inventory reservations give their units back.
    reservation_sweep_s: float = Field(default=5.0, gt=0, le=3600)
    # Each run handles at most this many, so one sweep never holds the write lock for long.
    reservation_sweep_batch: int = Field(default=500, ge=1, le=100_000)
    # The notifier: e-mails to the mail provider's SMTP port (providers.host:providers.mail_smtp_port),
    # `notify_max_attempts` sends with full-jitter backoff (base, cap) before a notification is failed.
    # New e-mails wake the notifier at once (a work signal); this interval is its safety poll and
    # the granularity of its retries.
    notify_interval_s: float = Field(default=5.0, gt=0, le=3600)
    notify_batch: int = Field(default=50, ge=1, le=10_000)
    notify_max_attempts: int = Field(default=8, ge=1, le=100)
    notify_backoff_base_s: float = Field(default=1.0, ge=0, le=3600)
    notify_backoff_cap_s: float = Field(default=300.0, ge=0, le=86_400)
    notify_timeout_s: float = Field(default=10.0, gt=0, le=300)
    notify_sender: str = "orders@mercato.local"
    # `mercato worker` serves /healthz, /readyz and /metrics here (0: off), for an orchestrator's probes.
    http_port: int = Field(default=8081, ge=0, le=65535)
    # How often each process publishes its breakers for /admin/resilience/breakers (ADR 0025).
    breaker_report_interval_s: float = Field(default=2.0, gt=0, le=300)
    # Read-model reconciliation (shop/reporting/reconcile.py): a sample of each read model compared
    # with the write model this often; only rows unchanged for `reconcile_settle_s` are compared.
    reconcile_interval_s: float = Field(default=600.0, gt=0)
    reconcile_sample: int = Field(default=200, ge=1, le=100_000)
    reconcile_settle_s: float = Field(default=300.0, ge=0)
    # The side jobs woken by work signals (relay, consumers, projectors, notifier) start a woken pass
    # at most this often, so under load one pass serves many commits (ADR 0055); an isolated event
    # still goes at once. Longer: fewer statements per event, read models and e-mails later. 0.3 s
    # since ADR 0089 (was 0.1): at 100 checkouts/s, 20.6–21.9 → 19.7–20.0 ms of CPU a checkout.
    side_job_window_s: float = Field(default=0.3, ge=0, le=5)


class ProcessPoolSettings(BaseModel):
    """The process pool for CPU-heavy jobs (kit/processes, ADR 0053): read-model reconciliation's
    comparisons today. At most `workers` jobs run and `max_queued` wait; a job finding the queue
    full waits up to `wait_s` for room, then is refused. `enabled=false` runs them inline."""

    enabled: bool = True
    workers: int = Field(default=1, ge=1, le=64)
    max_queued: int = Field(default=4, ge=0, le=10_000)
    wait_s: float = Field(default=30.0, ge=0, le=3600)


class CoordinationSettings(BaseModel):
    """Leader election for the worker's singleton jobs (ADR 0041).

    `election`: `etcd` (needs `etcd_endpoints`), `database` (leases in the shared database),
    `local` (one process: always leader), or `auto`: etcd when endpoints are set, else database
    leases on PostgreSQL, else local (embedded SQLite)."""

    election: Literal["auto", "etcd", "database", "local"] = "auto"
    # Comma-separated host:port of the etcd members (MERCATO_COORDINATION_ETCD_ENDPOINTS).
    etcd_endpoints: str = ""
    # A leader that has not renewed for this long loses its lease; a paused one is fenced off.
    lease_ttl_s: int = Field(default=10, ge=2, le=300)
    # The election's name: its etcd key / lease row, and the fenced resource in the database.
    election_name: str = Field(default="mercato-worker", min_length=1, max_length=120)


class RealtimeSettings(BaseModel):
    """WebSocket and SSE delivery (docs/realtime.md, ADR 0029)."""

    # SSE: a comment line this often keeps proxies from timing the stream out.
    sse_heartbeat_s: float = Field(default=15.0, gt=0, le=300)
    # WebSocket protocol pings (uvicorn's keepalive); a peer silent for ping_timeout_s is closed.
    ws_ping_interval_s: float = Field(default=20.0, gt=0, le=300)
    ws_ping_timeout_s: float = Field(default=40.0, gt=0, le=600)
    # permessage-deflate: off. Each connection would deflate every frame it is sent with its own
    # compressor (CPU per delivery, not per message) and hold its zlib state (tens of KiB per idle
    # connection); chat and order frames are small JSON (ADR 0038).
    ws_compression: bool = False
    auth_timeout_s: float = Field(default=5.0, gt=0, le=60)
    max_frame_bytes: int = Field(default=16_384, ge=256, le=1 << 20)
    max_text_chars: int = Field(default=4000, ge=1, le=100_000)
    # The per-connection outbound queue's caps, and how long it may stay over them before 1013.
    queue_max_messages: int = Field(default=1000, ge=1, le=1_000_000)
    queue_max_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30)
    slow_consumer_s: float = Field(default=10.0, gt=0, le=600)
    # False removes the caps (so no dropping, no paused reads, no 1013): the control run of
    # `mercato lab slow-consumer` only; never in production (a stuck client then grows memory).
    backpressure: bool = True
    # Presence heartbeat; an announcement expires after presence_ttl_s (a killed process's users go).
    presence_interval_s: float = Field(default=10.0, gt=0, le=600)
    presence_ttl_s: float = Field(default=25.0, gt=0, le=3600)
    # Inbound sends: per connection and per room (token buckets of kit/ratelimit).
    send_rate_per_s: int = Field(default=10, ge=1)
    send_burst: int = Field(default=20, ge=1)
    room_rate_per_s: int = Field(default=200, ge=1)
    # Under load, how long a chat send may wait for others to go to the stream with it in one publish
    # (Kafka's linger.ms; ADR 0092): only while >= 2 more are expected in that time (>= 200 sends/s
    # at 10 ms), so a send at a slower rate is never held. 0: never held.
    send_linger_ms: float = Field(default=10.0, ge=0, le=50)
    # The offline queue: a member who reconnects gets what it missed from history this far back.
    history_ttl_s: int = Field(default=7 * 86_400, ge=60)
    # Subscriptions' history reads (and subscribe authorizations) at once per API process (ADR 0078;
    # 0: half the database pool's steady size), so a subscribe storm leaves the rest of the pool to
    # HTTP requests and the chat persister; a subscribe that waits longer than history_read_wait_s
    # for a slot is answered `try_again` (it subscribes again with its `since`).
    history_reads: int = Field(default=0, ge=0, le=200)
    history_read_wait_s: float = Field(default=5.0, gt=0, le=60)
    # The stream consumers feeding real time (order feed, chat) are woken by messages reaching the
    # stream (kit/storage/signals.py); idle, they poll only this often, as a safety net.
    consumer_poll_s: float = Field(default=5.0, gt=0, le=5)
    # The chat persister's passes overlapped (ADR 0070: the next pass read and persisted while the
    # previous one is published and acknowledged). Off until a quiet rerun: on the loaded box its
    # `--find-max` ramp stopped near 60 msgs/s twice where the sequential passes reached 200-300.
    overlap_persister_passes: bool = False


class ChatSettings(BaseModel):
    """Chat message shards (ADR 0043): `MERCATO_CHAT_SHARD_URLS` lists the databases (comma list;
    `main` = the main database); empty = one shard, the main database. Only the first start reads it:
    from then on the shard map in the main database is the truth (`mercato shards add`)."""

    shard_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    shard_algorithm: Literal["ring", "rendezvous", "jump", "mod"] = "ring"
    shard_vnodes: int = Field(default=160, ge=1, le=10_000)
    # How long a process trusts its cached shard map; a rebalance waits twice this between steps.
    shard_map_refresh_s: float = Field(default=1.0, gt=0, le=60)
    shard_pool_size: int = Field(default=5, ge=1, le=100)

    @field_validator("shard_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        return split_list(value)


class ReleaseSettings(BaseModel):
    """This process's release identity and its runtime-configuration poll (ADRs 0045-0047).

    `version`: the code's release name, reported by every process (empty: the package version);
    `mercato migrate` refuses a contract step while a process reports a version that needs the old
    schema. `track`: which group this process serves in (`stable`, `canary`, `blue`, `green`); flag
    rules may target it. `config_poll_s`: how often the runtime configuration is checked (the bound
    on how long a new version takes to be in force). `inject_error_ratio`: a lab's bad build (that
    fraction of /v1 answers become 500); refused outside dev and test.
    """

    version: str = Field(default="", max_length=60)
    track: str = Field(default="stable", pattern=r"^[a-z][a-z0-9-]{0,19}$")
    config_poll_s: float = Field(default=1.0, gt=0, le=60)
    inject_error_ratio: float = Field(default=0.0, ge=0, le=1)
    # Where this release keeps customers' e-mail and display name during the rollout of sealing
    # (expand/contract; shop/identity/personal.py PersonalColumns; docs/runbooks/release.md):
    # plaintext (release 1.0) | dual (1.1) | sealed (1.2 and later).
    identity_personal_columns: Literal["plaintext", "dual", "sealed"] = "sealed"
