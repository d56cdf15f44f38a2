"""The checkout load's requests and the statement counter's phase rules."""

from __future__ import annotations

import pytest

from mercato.bench.checkout_client import CheckoutLoad
from mercato.bench.checkout_probe import StatementCounter, current_phase, phase_of_request
from mercato.kit.observability import request_id_var


def _load(**overrides: object) -> CheckoutLoad:
    values: dict[str, object] = {
        "port": 8000,
        "rate_per_s": 10.0,
        "duration_s": 1.0,
        "t0_s": 0.0,
        "tag": "ck1xab",
        "tokens": ("tok-a", "tok-b", "tok-c"),
        "skus": ("SKU-A", "SKU-B", "SKU-C"),
    }
    values.update(overrides)
    return CheckoutLoad(**values)  # type: ignore[arg-type]


def test_customers_rotate_and_each_post_has_its_own_key() -> None:
    load = _load(first_customer=2)
    put0, post0 = load.requests(0)
    put1, post1 = load.requests(1)
    assert put0.startswith(b"PUT /v1/carts/me/items/SKU-C HTTP/1.1\r\n")
    assert b"Authorization: Bearer tok-c\r\n" in put0
    assert b"X-Request-ID: ck1xab-0.cart\r\n" in put0
    assert put0.endswith(b'\r\n\r\n{"quantity":1}')
    assert b"Authorization: Bearer tok-a\r\n" in put1  # (2 + 1) % 3
    assert post0.startswith(b"POST /v1/checkout HTTP/1.1\r\n")
    assert b"Idempotency-Key: ck1xab-0\r\n" in post0
    assert b"Idempotency-Key: ck1xab-1\r\n" in post1
    head, body = post0.split(b"\r\n\r\n", 1)
    assert b"Content-Length: %d" % len(body) in head


def test_bare_mode_sends_two_gets_and_the_timetable_is_open_loop() -> None:
    load = _load(mode="bare", tokens=(), skus=())
    first, second = load.requests(7)
    assert first == second
    assert first.startswith(b"GET /bare HTTP/1.1\r\n")
    assert load.timetable().count == 10
    assert load.timetable().due_s(3) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "overrides",
    [{"host": "10.0.0.1"}, {"mode": "other"}, {"tokens": ("a",)}, {"timeout_s": 0.0}, {"max_connections": 0}],
)
def test_invalid_loads_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _load(**overrides)


def test_phases() -> None:
    assert phase_of_request("") is None
    assert phase_of_request("ck3x0a-17.cart") == "api:PUT cart line"
    assert phase_of_request("ck3x0a-17") == "api:POST checkout"
    assert phase_of_request("0f3a9c") == "api:other"
    assert current_phase("/tmp/x/psp.db") == "provider (own database)"
    token = request_id_var.set("ck3x0a-17")
    try:
        assert current_phase("/tmp/x/bench.db") == "api:POST checkout"
    finally:
        request_id_var.reset(token)
    assert current_phase(None) == "other"


def test_counter_snapshot() -> None:
    counter = StatementCounter()
    counter.statement("saga:load", "  select * from saga_instances")
    counter.statement("saga:load", "BEGIN")
    counter.transaction("saga:load")
    assert counter.snapshot() == {
        "statements": {"saga:load": 2},
        "transactions": {"saga:load": 1},
        "verbs": {"saga:load|SELECT": 1, "saga:load|BEGIN": 1},
    }
