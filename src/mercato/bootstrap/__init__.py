"""The composition root: the one place that picks backends and wires services together.

Nothing else decides "am I on PostgreSQL?"; everything else receives what it needs.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from mercato.bootstrap.backends import build_hub, build_product_cache, build_stream
from mercato.bootstrap.providers import ProviderCallSet, build_provider_calls
from mercato.config import Settings
from mercato.kit.auth import TokenCodec
from mercato.kit.auth.keys import KeyRing
from mercato.kit.balancing import Balancer, PrometheusBalancerHooks
from mercato.kit.cache import (
    RedisInvalidationBus,
)
from mercato.kit.clock import Clock, SystemClock
from mercato.kit.dynconfig import ConfigWatcher
from mercato.kit.flags import EvaluationContext, Flags
from mercato.kit.health import Drain, HealthRegistry
from mercato.kit.idempotency import IdempotencyStore
from mercato.kit.messaging import (
    JetStreamStream,
    MessagingHook,
    NullMessagingHook,
    Outbox,
    PrometheusMessagingHook,
    RedisStream,
    SqlLogStream,
    Stream,
)
from mercato.kit.privacy import Keyring, MasterKey
from mercato.kit.processes import ProcessPool
from mercato.kit.projections import Projection, ProjectionHook, Projector, StreamProjector
from mercato.kit.realtime import (
    Hub,
    SqlChannelHistory,
)
from mercato.kit.resilience import BreakerRegistry, BreakerReports, PrometheusResilienceHooks
from mercato.kit.sagas import PostgresSagaWakeups, RetrySchedule, SagaDefinition, SagaStore, SagaWakeups
from mercato.kit.sagas.events import OutboxEventSink
from mercato.kit.storage import Database, ReplicaHook, create_database
from mercato.kit.storage.metrics import PrometheusReplicaMetrics
from mercato.migrations import SCRIPT_LOCATION
from mercato.providers._client import ProviderPool, ProviderTimeout
from mercato.providers.carrier.client import CarrierClient
from mercato.providers.psp.client import PspClient
from mercato.runtime_appliers import build_runtime, wire_runtime
from mercato.runtime_config import RuntimeConfig
from mercato.schemas import catalog as event_catalog
from mercato.shop.cart.model import CartLimits
from mercato.shop.cart.service import CartService
from mercato.shop.catalog.cache import ProductCache
from mercato.shop.catalog.events import ProductEvents
from mercato.shop.catalog.service import CatalogService
from mercato.shop.chat.service import ChatService
from mercato.shop.chat.shardmap import ShardMap
from mercato.shop.chat.shards import ChatShardMetrics, ChatShards
from mercato.shop.checkout.adapters import HttpPaymentGateway, HttpShippingCarrier
from mercato.shop.checkout.service import CheckoutService, order_saga
from mercato.shop.identity.api_keys import ApiKeyService
from mercato.shop.identity.personal import READ_SEALED_FLAG, PersonalColumns, PersonalFields
from mercato.shop.identity.repository import IdentityRepository
from mercato.shop.identity.service import IdentityService
from mercato.shop.identity.sessions import SessionGuard
from mercato.shop.identity.signing_keys import SigningKeyStore
from mercato.shop.inventory.service import InventoryService
from mercato.shop.orders.model import OrderNotFound
from mercato.shop.orders.service import OrdersService
from mercato.shop.payments.service import PaymentsService

SEED_MARKER = "seed_completed_at"


@dataclass
class Container:
    settings: Settings
    clock: Clock
    db: Database
    token_codec: TokenCodec
    health: HealthRegistry
    catalog: CatalogService
    identity: IdentityService
    inventory: InventoryService
    cart: CartService
    orders: OrdersService
    idempotency: IdempotencyStore
    sagas: SagaStore
    saga_definitions: dict[str, SagaDefinition]
    checkout: CheckoutService
    psp: PspClient
    carrier: CarrierClient
    outbox: Outbox
    stream: Stream
    saga_events: OutboxEventSink
    # Each order's event-sourced payment ledger, kept by the `mercato.payments` consumer (a worker job).
    payments: PaymentsService
    # Real time (ADR 0029): this process's hub over the configured broker; the chat context; the
    # sequenced channels' history (order:<id>). Started and stopped by the app's lifespan.
    hub: Hub
    chat: ChatService
    channel_history: SqlChannelHistory
    # Metrics the container's own components record (the resilience hooks); the app's and the
    # worker's registries expose them by registering this one as a collector.
    metrics_registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    # How runners in other processes hear of new sagas (PostgreSQL NOTIFY); None: they poll.
    saga_wakeups: SagaWakeups | None = None
    # The breakers in front of the providers ("psp", "carrier"; "psp-reads"/"carrier-reads" for their
    # record lookups, "psp-undo"/"carrier-undo" for compensations), for /admin/resilience/breakers.
    breakers: BreakerRegistry = field(default_factory=BreakerRegistry)
    # This process's breakers as published for the others (the API shows the workers'), ADR 0025.
    breaker_reports: BreakerReports | None = None
    # `mercato_messaging_*` on `metrics_registry`: the stream (dead letters), the outbox relay
    # (published, backlog) and every consumer and stream projector (lag, redeliveries, dedup hits).
    messaging_hook: MessagingHook = field(default_factory=NullMessagingHook)
    # Revoked access tokens and vanished subjects (the bearer's guard), and partner API keys.
    sessions: SessionGuard | None = None
    api_keys: ApiKeyService | None = None
    # The access-token signing keys (ADR 0036): the ring `token_codec` uses, reloaded from the database.
    signing_keys: SigningKeyStore | None = None
    # GET /v{N}/products/{id} through the application cache (None: `cache.enabled` is off); with a
    # Redis tier, `cache_bus` carries invalidations to the other processes (started by the app).
    product_cache: ProductCache | None = None
    cache_bus: RedisInvalidationBus | None = None
    cache_redis: Redis | None = None
    # Customers' data keys (ADR 0052): in the shop's database, or one of its own.
    keyring: Keyring | None = None
    # The runtime configuration in force here (ADR 0045) and the flags it carries (ADR 0046).
    runtime: ConfigWatcher[RuntimeConfig] | None = None
    flags: Flags = field(default_factory=Flags)
    provider_policies: list[Any] = field(default_factory=list)  # checkout's, for the runtime config
    # CPU-heavy pure work off the loop (ADR 0053): worker processes, started on first use.
    cpu_pool: ProcessPool | None = None

    async def close(self) -> None:
        if self.cache_bus is not None:
            await self.cache_bus.aclose()
        if self.cache_redis is not None:
            await self.cache_redis.aclose()
        await self.psp.aclose()
        await self.carrier.aclose()
        if isinstance(self.stream, JetStreamStream | RedisStream):
            await self.stream.aclose()
        await self.hub.broker.aclose()
        if self.keyring is not None:
            await self.keyring.dispose()
        await self.chat.close()
        if self.cpu_pool is not None:
            await self.cpu_pool.close()
        await self.db.dispose()


def build_database(settings: Settings, *, replica_hook: ReplicaHook | None = None) -> Database:
    db = settings.database
    if db.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return create_database(
        db.url,
        pool_size=db.pool_size,
        max_overflow=db.max_overflow,
        pool_timeout_s=db.pool_timeout_s,
        statement_timeout_s=db.statement_timeout_s,
        echo=db.echo,
        sqlite_synchronous=db.sqlite_synchronous,
        replica_urls=db.replica_urls or None,
        replica_max_lag_s=db.replica_max_lag_s,
        replica_token_wait_s=db.replica_token_wait_s,
        replica_hook=replica_hook,
        probe_interval_s=db.probe_interval_s,
        probe_timeout_s=db.probe_timeout_s,
        probe_failures=db.probe_failures,
    )


def build_chat_shards(
    settings: Settings, db: Database, clock: Clock, registry: CollectorRegistry | None
) -> ChatShards:
    """The chat message shards (ADR 0043): the map's seed from the settings, a small pool per shard."""
    chat, base = settings.chat, settings.database
    initial = ShardMap.initial(chat.shard_urls, algorithm=chat.shard_algorithm, vnodes=chat.shard_vnodes)

    def connect(url: str) -> Database:
        return create_database(
            url,
            pool_size=chat.shard_pool_size,
            max_overflow=chat.shard_pool_size,
            pool_timeout_s=base.pool_timeout_s,
            statement_timeout_s=base.statement_timeout_s,
        )

    metrics = ChatShardMetrics(registry) if registry is not None else None
    return ChatShards(
        db, clock, initial=initial, refresh_s=chat.shard_map_refresh_s, connect=connect, metrics=metrics
    )


def build_container(
    settings: Settings, *, clock: Clock | None = None, separate_read_breakers: bool = True
) -> Container:
    """The shop, wired. `separate_read_breakers=False` puts the providers' record lookups behind the
    writes' breakers (what `mercato lab breaker` compares against); every deployment keeps the default.
    """
    clock = clock or SystemClock()
    metrics_registry = CollectorRegistry()
    db = build_database(settings, replica_hook=PrometheusReplicaMetrics(metrics_registry))
    # Access tokens are signed by the newest key shared through the database (ADR 0036).
    key_ring = KeyRing(overlap_s=settings.auth.access_ttl_s + settings.auth.signing_key_reload_s)
    signing_keys = SigningKeyStore(
        db,
        clock,
        key_ring,
        secret=settings.auth.secret.get_secret_value(),
        reload_s=settings.auth.signing_key_reload_s,
    )
    codec = TokenCodec(
        keys=key_ring,
        issuer=settings.auth.issuer,
        audience=settings.auth.audience,
        access_ttl_s=settings.auth.access_ttl_s,
        clock=clock,
    )
    health = HealthRegistry(drain=Drain(drain_s=settings.http.drain_s))
    health.add_check("database", db.ping)
    auth = settings.auth
    sessions = SessionGuard(
        db, clock, sync_interval_s=auth.revocation_sync_s, subject_ttl_s=auth.subject_cache_s
    )
    api_keys = ApiKeyService(
        db,
        clock,
        hash_key=ApiKeyService.derive_hash_key(auth.secret.get_secret_value()),
        cache_ttl_s=auth.api_key_cache_s,
    )
    outbox = Outbox(clock=clock, signals=db.signals)
    catalog = CatalogService(
        db, clock, outbox=outbox, events=ProductEvents(clock=clock, contract=event_catalog())
    )
    shop = settings.shop
    # The catalog service is the cart's PriceBook; the cart service is the orders' CartSource.
    cart = CartService(
        db,
        clock,
        catalog,
        CartLimits(max_quantity_per_line=shop.max_quantity_per_line, max_lines=shop.max_cart_lines),
    )
    inventory = InventoryService(db, clock, reservation_ttl_s=shop.reservation_ttl_s)
    orders = OrdersService(db, clock, cart)
    providers = settings.providers
    provider_timeout = ProviderTimeout(read_s=settings.checkout.provider_timeout_s, connect_s=1.0)
    network = settings.network
    keepalive_s = network.client_keepalive_expiry_s if network.client_max_keepalive_connections else 0.0
    pool = ProviderPool(max_connections=network.client_max_connections, keepalive_expiry_s=keepalive_s)
    # Several PSP instances: balanced per call, outliers ejected (ADR 0039); one: a plain client.
    psp_endpoints = providers.psp_endpoints()
    psp_balancer = None
    if len(psp_endpoints) > 1:
        psp_balancer = Balancer(
            psp_endpoints,
            policy=providers.balance,
            outlier=providers.outlier(),
            hooks=[PrometheusBalancerHooks(metrics_registry).for_pool("psp")],
        )
    psp = PspClient(psp_endpoints, timeout=provider_timeout, pool=pool, balancer=psp_balancer)
    carrier = CarrierClient(providers.carrier_base_url, timeout=provider_timeout, pool=pool)
    hooks = PrometheusResilienceHooks(metrics_registry)
    breakers = BreakerRegistry(clock=clock, hooks=[hooks])
    calls = build_provider_calls(
        settings, breakers=breakers, hooks=hooks, clock=clock, separate_reads=separate_read_breakers
    )
    saga_wakeups = PostgresSagaWakeups(db) if db.dialect == "postgresql" else None
    sagas = SagaStore(db, clock, wakeups=saga_wakeups)
    saga = order_saga(
        orders=orders,
        stock=inventory,
        payments=HttpPaymentGateway(psp, calls.psp, reads=calls.psp_reads, undo=calls.psp_undo),
        carrier=HttpShippingCarrier(
            carrier, calls.carrier, reads=calls.carrier_reads, undo=calls.carrier_undo
        ),
        reservation_ttl_s=shop.reservation_ttl_s,
        deadline_s=settings.checkout.saga_deadline_s,
        remote_timeout_s=settings.checkout.provider_timeout_s + 0.5,
        remote_retry=RetrySchedule(max_attempts=settings.checkout.provider_attempts, base_s=0.1, cap_s=2.0),
        clock=clock,
    )
    # Every event is stamped with its schema version and validated before it reaches the outbox.
    saga_events = OutboxEventSink(outbox, source="mercato/checkout", clock=clock, contract=event_catalog())
    checkout = CheckoutService(
        db,
        clock,
        orders=orders,
        sagas=sagas,
        saga=saga,
        events=saga_events,
        stock=inventory,  # its time to live is the shop's, as the saga's step gives it
    )
    messaging_hook = PrometheusMessagingHook(metrics_registry)
    stream = build_stream(settings, db, clock=clock, hook=messaging_hook)
    orders.attach_checkout(checkout)

    async def order_owner(order_id: uuid.UUID) -> str | None:
        try:
            order = await orders.get(order_id, customer_id=None, read_all=True)
        except OrderNotFound:
            return None
        return str(order.customer_id)

    chat = ChatService(
        db,
        clock,
        order_owner=order_owner,
        history_ttl_s=settings.realtime.history_ttl_s,
        shards=build_chat_shards(settings, db, clock, metrics_registry),
    )
    channel_history = SqlChannelHistory(db, clock=clock)
    hub = build_hub(settings, db, chat=chat, channel_history=channel_history, registry=metrics_registry)
    keyring = build_keyring(settings, db, clock)
    product_cache, cache_bus, cache_redis = build_product_cache(
        settings, catalog, clock=clock, registry=metrics_registry
    )
    # Releases still using the plaintext personal columns report so: contract 0028 waits (ADR 0047);
    # a dual-writing one reads the sealed fields when the flag says so.
    columns = PersonalColumns(settings.release.identity_personal_columns)
    runtime, flags = build_runtime(settings, db, clock=clock, registry=metrics_registry, needs=columns.needs)
    read_sealed = partial(flags.is_on, READ_SEALED_FLAG, EvaluationContext())
    identity_repo = IdentityRepository(PersonalFields(keyring), columns=columns, read_sealed=read_sealed)
    policies = [getattr(calls, f.name).policy for f in fields(calls)]
    wire_runtime(
        runtime,
        breakers=breakers,
        policies=policies,
        clients={"psp": psp, "carrier": carrier},
        endpoints={"psp": providers.psp_base_url, "carrier": providers.carrier_base_url},
        cache=None if product_cache is None else product_cache.cache,
    )
    return Container(
        settings=settings,
        clock=clock,
        db=db,
        token_codec=codec,
        health=health,
        catalog=catalog,
        identity=IdentityService(
            db,
            clock,
            codec,
            settings.auth,
            sessions=sessions,
            signing_keys=signing_keys,
            keyring=keyring,
            repository=identity_repo,
        ),
        keyring=keyring,
        inventory=inventory,
        cart=cart,
        orders=orders,
        idempotency=IdempotencyStore(db, clock=clock),
        sagas=sagas,
        saga_definitions={saga.name: saga},
        checkout=checkout,
        psp=psp,
        carrier=carrier,
        outbox=outbox,
        stream=stream,
        saga_events=saga_events,
        payments=PaymentsService(db, clock),
        hub=hub,
        chat=chat,
        channel_history=channel_history,
        metrics_registry=metrics_registry,
        saga_wakeups=saga_wakeups,
        breakers=breakers,
        breaker_reports=BreakerReports(
            db,
            clock,
            process=f"{socket.gethostname()}:{os.getpid()}",
            # Three missed reports and the process is taken for gone.
            ttl_s=max(5.0, 3 * settings.worker.breaker_report_interval_s),
        ),
        messaging_hook=messaging_hook,
        sessions=sessions,
        api_keys=api_keys,
        signing_keys=signing_keys,
        product_cache=product_cache,
        cache_bus=cache_bus,
        cache_redis=cache_redis,
        runtime=runtime,
        flags=flags,
        provider_policies=[p for p in policies if p is not None],
        cpu_pool=build_cpu_pool(settings, metrics_registry),
    )


def build_cpu_pool(settings: Settings, registry: CollectorRegistry) -> ProcessPool | None:
    pool = settings.processes
    if not pool.enabled:
        return None
    return ProcessPool(
        name="cpu",
        max_workers=pool.workers,
        max_queued=pool.max_queued,
        wait_s=pool.wait_s,
        registry=registry,
    )


def build_keyring(settings: Settings, db: Database, clock: Clock) -> Keyring:
    privacy = settings.privacy
    secret = privacy.master_secret or settings.auth.secret
    if not privacy.keyring_url:
        return Keyring(db, MasterKey(secret.get_secret_value()), clock)
    own = create_database(privacy.keyring_url, pool_size=2, max_overflow=2)
    return Keyring(own, MasterKey(secret.get_secret_value()), clock, owns_schema=True)


def build_projector(
    container: Container, projection: Projection, *, batch_size: int, hook: ProjectionHook | None = None
) -> Projector:
    """A projector fed by the configured stream: the SQL log's table read by offset, or, on a broker,
    a consumer group with the checkpoint as dedup (`StreamProjector`)."""
    if isinstance(container.stream, SqlLogStream):
        return Projector(container.db, projection, batch_size=batch_size, clock=container.clock, hook=hook)
    return StreamProjector(
        container.db,
        projection,
        container.stream,
        batch_size=batch_size,
        clock=container.clock,
        hook=hook,
        messaging_hook=container.messaging_hook,
    )


__all__ = [
    "SCRIPT_LOCATION",
    "SEED_MARKER",
    "Container",
    "ProviderCallSet",
    "build_chat_shards",
    "build_container",
    "build_database",
    "build_projector",
    "build_provider_calls",
]
