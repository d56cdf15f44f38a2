"""`mercato bench checkout` end to end, briefly: embedded Mercato on SQLite, a few checkouts at a low rate."""

from __future__ import annotations

from mercato.bench.checkout import CheckoutBenchOptions, run_checkout_bench
from mercato.bench.checkout_report import LOAD_GENERATOR, MACHINE, POSTGRESQL


def test_a_short_checkout_bench_accounts_for_every_checkout() -> None:
    options = CheckoutBenchOptions(
        rates=(4.0,),
        duration_s=1.5,
        warmup_s=0.0,
        drain_s=15.0,
        mode="embedded",
        customers=8,
        products=8,
    )
    report = run_checkout_bench(options)

    assert len(report.steps) == 1
    step = report.steps[0]
    counts = step.counts
    assert counts.scheduled == 6
    assert counts.scheduled == counts.ok + counts.errors
    assert counts.errors == 0
    # Every accepted checkout's saga is found and, with healthy providers, completes.
    assert step.completion.accounted == counts.ok
    assert step.completion.completed == counts.ok
    assert step.completion.unknown == 0
    assert step.completion.histogram.count == counts.ok
    assert step.accept.count == counts.ok
    assert step.baseline is not None
    assert step.baseline.counts.ok == counts.scheduled
    # The statement counter saw both requests and the saga's steps; the POST made the reservation
    # (the bench's stock is ample), so no saga move of the runner's reserved anything (ADR 0087).
    phases = step.round_trips_per_checkout()
    for phase in ("api:PUT cart line", "api:POST checkout", "saga:authorize_payment", "saga:mark_complete"):
        assert phases.get(phase, 0) >= 1, phase
    assert phases.get("saga:reserve_inventory", 0) == 0
    assert report.to_dict()["steps"][0]["sagas"]["completed"] == counts.ok
    # CPU: the server, the load generator and the machine; the system is the machine less the generator.
    cpu = step.server_cpu_s
    assert cpu["embedded"] > 0
    assert cpu[LOAD_GENERATOR] > 0
    assert cpu[MACHINE] >= cpu["embedded"]
    assert step.system_cpu_s == cpu[MACHINE] - cpu[LOAD_GENERATOR]
    assert POSTGRESQL in cpu  # SQLite here: whatever PostgreSQL servers the machine runs did
