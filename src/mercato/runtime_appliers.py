"""How each process applies a runtime-configuration version to the parts built at start (ADR 0045).

Each function returns a *preparer* for `ConfigWatcher.on_change`: it builds everything the new version
needs (and raises if it cannot), returning the commit that installs it with plain assignments. The
gateway registers its own (rate-limit policies, shedding limits, Cache-Control lifetimes).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import partial

from prometheus_client import CollectorRegistry

from mercato import __version__
from mercato.config import Settings
from mercato.kit.cache import Cache, CacheTtls
from mercato.kit.clock import Clock
from mercato.kit.dynconfig import ConfigStore, ConfigWatcher, ProcessIdentity, PrometheusConfigHook
from mercato.kit.flags import Flags, FlagsCollector
from mercato.kit.resilience import BreakerRegistry, ResiliencePolicy
from mercato.kit.storage import Database
from mercato.providers._client import ProviderHttpClient
from mercato.runtime_config import RuntimeConfig, parse_runtime

__all__ = [
    "Commit",
    "breakers_preparer",
    "build_runtime",
    "cache_preparer",
    "discovery_preparer",
    "flags_preparer",
    "provider_calls_preparer",
    "release_version",
    "wire_runtime",
]

Commit = Callable[[], None]


def release_version(settings: Settings) -> str:
    return settings.release.version or __version__


def build_runtime(
    settings: Settings,
    db: Database,
    *,
    clock: Clock,
    registry: CollectorRegistry,
    needs: tuple[str, ...] = (),
) -> tuple[ConfigWatcher[RuntimeConfig], Flags]:
    """The watcher over this deployment's store (role `cli` until a process names itself) and the
    flag evaluator it feeds; no I/O here."""
    parse = partial(parse_runtime, base=settings)
    store = ConfigStore(db, clock, validate=parse)
    identity = ProcessIdentity(
        process_id=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
        role="cli",
        app_version=release_version(settings),
        needs=needs,
    )
    watcher = ConfigWatcher(
        store,
        parse,
        clock=clock,
        identity=identity,
        poll_interval_s=settings.release.config_poll_s,
        hook=PrometheusConfigHook(registry),
    )
    flags = Flags()
    registry.register(FlagsCollector(flags))
    watcher.on_change(flags_preparer(flags))
    return watcher, flags


def wire_runtime(
    runtime: ConfigWatcher[RuntimeConfig],
    *,
    breakers: BreakerRegistry,
    policies: list[ResiliencePolicy | None],
    clients: dict[str, ProviderHttpClient],
    endpoints: dict[str, str],
    cache: Cache | None,
) -> None:
    """The container's parts that follow the runtime configuration (the gateway adds the edge's)."""
    runtime.on_change(breakers_preparer(breakers))
    runtime.on_change(provider_calls_preparer(policies))
    runtime.on_change(discovery_preparer(clients, endpoints))
    if cache is not None:
        runtime.on_change(cache_preparer(cache))


def flags_preparer(flags: Flags) -> Callable[[RuntimeConfig], Commit]:
    def prepare(config: RuntimeConfig) -> Commit:
        specs = dict(config.flags)
        return lambda: flags.replace(specs)

    return prepare


def cache_preparer(cache: Cache) -> Callable[[RuntimeConfig], Commit]:
    def prepare(config: RuntimeConfig) -> Commit:
        c = config.cache
        ttls = CacheTtls(
            fresh_s=c.fresh_s,
            stale_while_revalidate_s=c.stale_while_revalidate_s,
            stale_if_error_s=c.stale_if_error_s,
            negative_s=c.negative_s,
            local_fresh_s=c.local_fresh_s,
            xfetch_beta=cache.ttls.xfetch_beta,
        )

        def commit() -> None:
            cache.ttls = ttls

        return commit

    return prepare


def breakers_preparer(breakers: BreakerRegistry) -> Callable[[RuntimeConfig], Commit]:
    """Thresholds over each breaker's start-up configuration (an absent section restores it)."""
    started = {breaker.name: breaker.config for breaker in breakers}

    def prepare(config: RuntimeConfig) -> Commit:
        for breaker in breakers:  # breakers made after registration start from their own config
            started.setdefault(breaker.name, breaker.config)
        # BreakerConfig checks itself: an impossible combination raises here, before any commit.
        new = {name: config.breakers.apply(base) for name, base in started.items()}

        def commit() -> None:
            for breaker in breakers:
                breaker.config = new.get(breaker.name, breaker.config)

        return commit

    return prepare


def provider_calls_preparer(
    found: list[ResiliencePolicy | None],
) -> Callable[[RuntimeConfig], Commit]:
    """Timeouts, attempts and retry-budget ratio of the provider policies, over their start-up values
    (None: resilience is off; one policy may serve several call kinds)."""
    policies = list({id(p): p for p in found if p is not None}.values())
    started = {
        id(p): (p.total_timeout_s, p.retry, None if p.budget is None else p.budget.ratio) for p in policies
    }

    def prepare(config: RuntimeConfig) -> Commit:
        limits = config.provider_calls
        plans = []
        for policy in policies:
            total_s, retry, ratio = started[id(policy)]
            changes: dict[str, object] = {}
            if limits.max_attempts is not None:
                changes["max_attempts"] = limits.max_attempts
            if limits.attempt_timeout_s is not None:
                changes["timeout_s"] = limits.attempt_timeout_s
            new_retry = replace(retry, **changes)  # type: ignore[arg-type]
            new_total = limits.total_timeout_s if limits.total_timeout_s is not None else total_s
            new_ratio = limits.retry_budget_ratio if limits.retry_budget_ratio is not None else ratio
            plans.append((policy, new_total, new_retry, new_ratio))

        def commit() -> None:
            for policy, total_s, retry, ratio in plans:
                policy.total_timeout_s = total_s
                policy.retry = retry
                if policy.budget is not None and ratio is not None:
                    policy.budget.ratio = ratio

        return commit

    return prepare


def discovery_preparer(
    clients: dict[str, ProviderHttpClient], defaults: dict[str, str]
) -> Callable[[RuntimeConfig], Commit]:
    """Provider endpoints from the document, or the start-up ones when it names none."""

    def prepare(config: RuntimeConfig) -> Commit:
        urls = {
            name: getattr(config.discovery, name) or defaults[name] for name in clients if name in defaults
        }

        def commit() -> None:
            for name, url in urls.items():
                clients[name].base_url = url

        return commit

    return prepare
