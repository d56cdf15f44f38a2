"""The HAProxy harness against real HAProxy and real backend processes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mercato.cluster.haproxy import Backend, HAProxy, HAProxySettings, haproxy_binary, render_config
from tests.integration.haproxy_support import TinyBackends

try:
    haproxy_binary()
except RuntimeError:  # pragma: no cover - CI installs haproxy
    pytest.skip("haproxy not installed", allow_module_level=True)


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[TinyBackends]:
    tiny = TinyBackends(tmp_path / "backends", 3).start()
    try:
        yield tiny
    finally:
        tiny.stop()


def test_config_has_health_checks_and_slow_start() -> None:
    text = render_config(
        [Backend("a", "127.0.0.1", 1), Backend("b", "127.0.0.1", 2)],
        HAProxySettings(balance="leastconn", slowstart_s=7),
        port=10,
        stats_port=11,
        runtime_port=12,
    )
    assert "option httpchk GET /readyz" in text
    assert "balance leastconn" in text
    assert text.count("slowstart 7s") == 2
    with pytest.raises(ValueError, match="unique"):
        render_config([Backend("a", "h", 1)] * 2, HAProxySettings(), port=1, stats_port=2, runtime_port=3)
    with pytest.raises(ValueError, match="algorithm"):
        HAProxySettings(balance="magic")


def test_balances_drains_and_reports(tmp_path: Path, backends: TinyBackends) -> None:
    settings = HAProxySettings(balance="roundrobin", check_interval_ms=200, slowstart_s=0)
    with HAProxy(tmp_path / "hlb_haproxy", backends.backends, settings) as proxy:
        proxy.wait_up(3, timeout_s=15)
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            seen = Counter(client.get("/x").text for _ in range(30))
        assert seen == {b.name: 10 for b in backends.backends}
        assert sum(proxy.request_counts().values()) == 30

        # Runtime API: drain one, set another's weight to 0 → all traffic to the third.
        first, second, third = (b.name for b in backends.backends)
        proxy.drain(first)
        proxy.set_weight(second, 0)
        assert proxy.server(first).status == "DRAIN"
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            assert {client.get("/x").text for _ in range(10)} == {third}
        proxy.enable(first)
        proxy.set_weight(second, 100)
        proxy.disable(third)
        assert proxy.server(third).status == "MAINT"
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            assert {client.get("/x").text for _ in range(10)} == {first, second}
        proxy.enable(third)

        # A failing /readyz takes the server out; health recovery brings it back.
        backends.set_ready(first, False)
        proxy.wait_status(first, "DOWN", timeout_s=10)
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            assert first not in {client.get("/x").text for _ in range(12)}
        backends.set_ready(first, True)
        proxy.wait_status(first, "UP", timeout_s=10)
        assert "haproxy_server_" in proxy.metrics()


def test_add_and_delete_server_at_runtime(tmp_path: Path, backends: TinyBackends) -> None:
    first, *rest = backends.backends
    settings = HAProxySettings(check_interval_ms=200, slowstart_s=1)
    with HAProxy(tmp_path / "hlb_haproxy", [first], settings) as proxy:
        proxy.wait_up(1, timeout_s=15)
        for b in rest:
            proxy.add_server(b)
        proxy.wait_up(3, timeout_s=15)
        proxy.del_server(first.name)
        assert sorted(s.name for s in proxy.stats()) == sorted(b.name for b in rest)
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            assert {client.get("/x").text for _ in range(10)} == {b.name for b in rest}
