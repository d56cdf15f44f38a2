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
from functools import partial

from prometheus_client import CollectorRegistry

from mercato import __version__
from mercato.config import Settings
from mercato.kit.cache import Cache, CacheTtls
from mercato.kit.clock import Clock
from mercato.kit.dynconfig import ConfigStore, ConfigWatcher, ProcessIdentity, PrometheusConfigHook
from mercato.kit.flags import Flags, FlagsCollector
from mercato.kit.resilience import BreakerRegistry
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
    "release_version",
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
