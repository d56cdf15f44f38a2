"""The runtime configuration (ADR 0045) through the real app: a stored version changes rate limits,
shedding limits, Cache-Control lifetimes, cache TTLs, breaker thresholds, provider endpoints and flags
on the next poll; an invalid document is refused whole; a rollback restores the previous behaviour."""

from __future__ import annotations

from typing import Any

import pytest

from mercato.bootstrap import Container
from mercato.kit.backpressure import Priority
from mercato.kit.dynconfig import ConfigConflict, ConfigInvalid, ConfigWatcher
from mercato.runtime_config import RuntimeConfig
from tests.integration.shop_support import api, product

TIGHT_POLICY: dict[str, Any] = {
    "rules": [
        {
            "name": "tight-products",
            "dimensions": ["ip"],
            "match": {"path_prefix": "/v1/products"},
            "limit": {"rate": 1, "period_s": 3600, "burst": 2},
        }
    ]
}


def _runtime(container: Container) -> ConfigWatcher[RuntimeConfig]:
    assert container.runtime is not None
    return container.runtime


async def test_rate_limit_policy_changes_at_run_time_and_rollback_restores_it(container: Container) -> None:
    runtime = _runtime(container)
    async with api(container) as http:
        assert [(await http.get("/v1/products")).status_code for _ in range(3)] == [200, 200, 200]
        await runtime.store.put({"ratelimit": {"policies": TIGHT_POLICY}}, author="test")
        assert await runtime.poll_once()
        statuses = [(await http.get("/v1/products")).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        await runtime.store.rollback(to_version=None, author="test")
        assert await runtime.poll_once()
        assert runtime.version == 2
        assert [(await http.get("/v1/products")).status_code for _ in range(3)] == [200, 200, 200]


async def test_shedding_limits_cache_lifetimes_breakers_and_endpoints_follow_the_document(
    container: Container,
) -> None:
    runtime = _runtime(container)
    item = await product(container, "RC-1", 1000)
    async with api(container) as http:
        shedder = http._transport.app.state.load_shedder  # type: ignore[attr-defined]
        assert shedder.max_inflight == 64
        before = (await http.get(f"/v1/products/{item.id}")).headers["cache-control"]
        assert "max-age=60" in before
        breaker = next(iter(container.breakers))
        assert breaker.config.consecutive_failures == 8
        await runtime.store.put(
            {
                "backpressure": {"max_inflight": 8, "normal_share": 0.5, "sheddable_share": 0.25},
                "edge_cache": {"product_max_age_s": 7},
                "cache": {"fresh_s": 2.5},
                "breakers": {"consecutive_failures": 3, "minimum_calls": 5},
                "provider_calls": {"total_timeout_s": 1.5, "max_attempts": 2, "retry_budget_ratio": 0.05},
                "discovery": {"psp": "http://127.0.0.1:26001"},
            },
            author="test",
            comment="tighten",
        )
        await runtime.poll_once()
        assert (shedder.max_inflight, shedder.ceiling(Priority.SHEDDABLE)) == (8, 2)
        assert "max-age=7," in (await http.get(f"/v1/products/{item.id}")).headers["cache-control"]
        assert container.product_cache is not None
        assert container.product_cache.cache.ttls.fresh_s == 2.5
        assert all(
            b.config.consecutive_failures == 3 and b.config.minimum_calls == 5 for b in container.breakers
        )
        assert container.psp.base_url == "http://127.0.0.1:26001"
        policies = container.provider_policies
        assert policies
        assert all(p.total_timeout_s == 1.5 and p.retry.max_attempts == 2 for p in policies)
        assert all(p.budget is not None and p.budget.ratio == 0.05 for p in policies)
        # Rolled back to nothing: every process is back on its start-up settings.
        await runtime.store.rollback(to_version=0, author="test")
        await runtime.poll_once()
        assert shedder.max_inflight == 64
        assert "max-age=60" in (await http.get(f"/v1/products/{item.id}")).headers["cache-control"]
        assert breaker.config.consecutive_failures == 8
        assert container.psp.base_url == container.settings.providers.psp_base_url
        first = container.provider_policies[0]
        assert first.total_timeout_s == container.settings.checkout.provider_timeout_s
        assert first.retry.max_attempts != 2
        assert first.budget is not None
        assert first.budget.ratio == 0.1


async def test_search_v2_flag_switches_the_search_implementation(container: Container) -> None:
    runtime = _runtime(container)
    await product(container, "RC-SHOE", 5000, name="Red running shoe")
    async with api(container) as http:
        old = (await http.get("/v1/products", params={"q": "shoe red"})).json()["items"]
        assert old == []  # v1: the string as typed
        flag = {"rollout": [{"variant": "on", "percent": 100}]}
        await runtime.store.put({"flags": {"catalog.search_v2": flag}}, author="test")
        await runtime.poll_once()
        new = (await http.get("/v1/products", params={"q": "shoe red"})).json()["items"]
        assert [p["sku"] for p in new] == ["RC-SHOE"]
        # The kill switch: off everywhere on the next poll.
        await runtime.store.put({"flags": {"catalog.search_v2": {**flag, "enabled": False}}}, author="test")
        await runtime.poll_once()
        assert (await http.get("/v1/products", params={"q": "shoe red"})).json()["items"] == []
    assert container.flags.counts[("catalog.search_v2", "on")] == 1


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        ({"backpressure": {"max_inflight": 0}}, "backpressure.max_inflight"),
        ({"backpressure": {"sheddable_share": 0.9, "normal_share": 0.5}}, "sheddable_share"),
        ({"edge_cache": {"product_max_age_s": "soon"}}, "edge_cache.product_max_age_s"),
        ({"edge_cahce": {}}, "edge_cahce"),
        ({"cache": {"backend": "redis"}}, "cache.backend: not changeable"),
        ({"ratelimit": {"policies": {"rules": [{"name": "x"}]}}}, "ratelimit.policies"),
        ({"flags": {"f": {"default_variant": "maybe"}}}, "unknown variant"),
        ({"discovery": {"psp": "ftp://x"}}, "discovery.psp"),
        ({"provider_calls": {"total_timeout_s": 30}}, "exceeds the saga step's budget"),
        ({"breakers": {"failure_rate_threshold": 0}}, "breakers.failure_rate_threshold"),
    ],
)
async def test_an_invalid_document_is_refused_with_the_reason_and_nothing_is_stored(
    container: Container, document: dict[str, Any], needle: str
) -> None:
    store = _runtime(container).store
    with pytest.raises(ConfigInvalid) as refused:
        await store.put(document, author="test")
    assert needle in str(refused.value)
    assert await store.latest_version() == 0


async def test_a_version_this_process_cannot_prepare_is_rejected_whole(container: Container) -> None:
    runtime = _runtime(container)
    await runtime.store.put({"flags": {"a": {"rollout": [{"variant": "on", "percent": 100}]}}}, author="t")
    await runtime.poll_once()

    def picky(config: RuntimeConfig) -> Any:
        if "b" in config.flags:
            raise ValueError("cannot build this")
        return lambda: None

    runtime.on_change(picky)
    await runtime.store.put({"flags": {"b": {}}}, author="t")
    assert not await runtime.poll_once()
    # Nothing of version 2 is in force, not even the flags (prepared before the failing preparer).
    assert runtime.version == 1
    assert set(container.flags.specs) == {"a"}
    assert runtime.last_error is not None
    assert "cannot build this" in runtime.last_error


async def test_history_keeps_who_when_why_and_writers_cannot_both_win(container: Container) -> None:
    store = _runtime(container).store
    first = await store.put({"edge_cache": {"list_max_age_s": 5}}, author="alice", comment="faster lists")
    await store.put({}, author="bob", comment="back", expected_version=1)
    with pytest.raises(ConfigConflict):
        await store.put({}, author="carol", expected_version=1)
    history = await store.history()
    assert [(v.version, v.author, v.comment) for v in history] == [
        (2, "bob", "back"),
        (1, "alice", "faster lists"),
    ]
    assert history[1].created_at == first.created_at


async def test_each_poll_reports_the_running_version(container: Container) -> None:
    runtime = _runtime(container)
    await runtime.store.put({}, author="t")
    await runtime.poll_once()
    reports = await runtime.store.processes(seen_within_s=60)
    mine = [r for r in reports if r.process_id == runtime.identity.process_id]
    assert mine
    assert mine[0].config_version == 1
    assert mine[0].app_version == runtime.identity.app_version
