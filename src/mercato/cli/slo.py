"""The shop's SLOs and the Prometheus rules that watch them (the SRE workbook's multi-window,
multi-burn-rate alerts, chapter 5, "Alerting on SLOs").

The SLOs are data (`SLOS`); `deploy/prometheus/rules/slos.rules.yml` is rendered from them by
`mercato observability slo-rules`, and a test fails when the committed file and this module disagree,
so a journey, a target or a threshold is changed in one place. Every selector names a metric the
processes really export: `mercato_http_requests_total{method,route,status}` and
`mercato_http_request_duration_seconds` (buckets `LATENCY_BUCKETS`) by route template, scraped as
job `mercato-api`; and `mercato_saga_*` from the saga runner (job `mercato-worker`, or `mercato-api`
under `mercato up`, where the runner lives in the API process).

Each SLI is recorded as an *error ratio* (bad events / all events) over 5m, 30m, 1h, 2h, 6h, 1d and 3d,
and the objective as an *error budget* series (1 - target). Three alerts cover every SLO at once:

| alert | burn rate | long window | short window | budget spent when it fires | severity |
|---|---|---|---|---|---|
| `MercatoSLOFastBurn` | 14.4x | 1h | 5m | 2 % of 30 days' | page |
| `MercatoSLOSlowBurn` | 6x | 6h | 30m | 5 % of 30 days' | page |
| `MercatoSLOBudgetBurn` | 1x | 3d | 6h | 10 % of 30 days' | ticket |

The short window (1/12 of the long one) makes an alert stop soon after the burn stops.
"""

from __future__ import annotations

from dataclasses import dataclass

from mercato.kit.observability.metrics import LATENCY_BUCKETS
from mercato.shop.checkout.model import ORDER_SAGA

__all__ = [
    "ALERTS",
    "SLOS",
    "WINDOWS",
    "BurnAlert",
    "Slo",
    "render_rules",
]

API_JOB = "mercato-api"
# The saga runner runs in the worker (distributed) or in the API process (`mercato up`).
SAGA_JOBS = "mercato-worker|mercato-api"
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
PERIOD_DAYS = 30

_REQUESTS = "mercato_http_requests_total"
_LATENCY = "mercato_http_request_duration_seconds"


@dataclass(frozen=True, slots=True)
class Slo:
    """One SLI of one journey: `bad`/`total` are counter selectors (no range), the ratio of their
    rates is the error ratio."""

    journey: str
    sli: str  # availability | latency | completion
    target: float  # e.g. 0.999: 99.9 % of events good over 30 days
    total: str
    bad: str
    description: str

    @property
    def budget(self) -> float:
        return round(1.0 - self.target, 10)


@dataclass(frozen=True, slots=True)
class BurnAlert:
    name: str
    burn_rate: float
    long_window: str
    short_window: str
    severity: str  # page | ticket
    for_: str

    @property
    def budget_share(self) -> float:
        """Share of the 30-day budget spent by the time the long window alone fires."""
        hours = {"1h": 1, "6h": 6, "3d": 72}[self.long_window]
        return self.burn_rate * hours / (PERIOD_DAYS * 24)


ALERTS = (
    BurnAlert("MercatoSLOFastBurn", 14.4, "1h", "5m", "page", "2m"),
    BurnAlert("MercatoSLOSlowBurn", 6.0, "6h", "30m", "page", "15m"),
    BurnAlert("MercatoSLOBudgetBurn", 1.0, "3d", "6h", "ticket", "1h"),
)


def _le(seconds: float) -> str:
    """The `le` label prometheus_client writes for a bucket bound (floatToGoString: 0.25, 1.0)."""
    if seconds not in LATENCY_BUCKETS:
        raise ValueError(
            f"{seconds} s is not a bucket bound of {LATENCY_BUCKETS}: the SLI would be approximate"
        )
    return repr(float(seconds))


def _http(
    journey: str, matcher: str, *, availability: float, latency: float, threshold_s: float
) -> list[Slo]:
    selector = f'job="{API_JOB}",{matcher}'
    return [
        Slo(
            journey,
            "availability",
            availability,
            total=f"{_REQUESTS}{{{selector}}}",
            bad=f'{_REQUESTS}{{{selector},status=~"5.."}}',
            description=f"{availability:.1%} of {journey} requests answered without a 5xx",
        ),
        Slo(
            journey,
            "latency",
            latency,
            total=f"{_LATENCY}_count{{{selector}}}",
            # bad = all - fast; recorded as 1 - fast/all (see `_ratio`).
            bad=f'{_LATENCY}_bucket{{{selector},le="{_le(threshold_s)}"}}',
            description=f"{latency:.0%} of {journey} requests answered within {threshold_s * 1000:g} ms",
        ),
    ]


# Journeys by route template: the v1 and v2 representations of the same reads count together.
SLOS: tuple[Slo, ...] = (
    *_http(
        "browse",
        r'method="GET",route=~"/v[12]/products|/v[12]/products/\\{product_id\\}"',
        availability=0.999,
        latency=0.99,
        threshold_s=0.25,
    ),
    *_http("cart", 'route=~"/v1/carts/me.*"', availability=0.999, latency=0.99, threshold_s=0.25),
    *_http(
        "checkout", 'method="POST",route="/v1/checkout"', availability=0.999, latency=0.99, threshold_s=1.0
    ),
    *_http(
        "order_status",
        r'method="GET",route=~"/v[12]/orders/\\{order_id\\}"',
        availability=0.999,
        latency=0.99,
        threshold_s=0.25,
    ),
    Slo(
        "checkout",
        "completion",
        0.999,
        total=f'mercato_saga_finished_total{{job=~"{SAGA_JOBS}",saga_type="{ORDER_SAGA}"}}',
        bad=f'mercato_saga_finished_total{{job=~"{SAGA_JOBS}",saga_type="{ORDER_SAGA}",status="failed"}}',
        description="99.9% of accepted checkouts end completed or compensated, never failed (stuck "
        "in a half-undone state that needs an operator)",
    ),
)


def _ratio(slo: Slo, window: str) -> str:
    if slo.sli == "latency":
        fast = f"sum(rate({slo.bad}[{window}]))"
        return f"1 - ({fast} / sum(rate({slo.total}[{window}])))"
    # `or vector(0)`: no bad series yet means no bad events, not "no data".
    return f"(sum(rate({slo.bad}[{window}])) or vector(0)) / sum(rate({slo.total}[{window}]))"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _recording(slo: Slo) -> list[str]:
    labels = [f"        journey: {slo.journey}", f"        sli: {slo.sli}"]
    lines = [
        "    - record: mercato:slo_error_budget:ratio",
        f"      expr: vector({slo.budget!r})",
        "      labels:",
        *labels,
        f"        objective: {_quote(slo.description)}",
    ]
    for window in WINDOWS:
        lines += [
            f"    - record: mercato:slo_errors:ratio_rate{window}",
            f"      expr: {_quote(_ratio(slo, window))}",
            "      labels:",
            *labels,
        ]
    return lines


def _over(window: str, burn_rate: float) -> str:
    return (
        f"mercato:slo_errors:ratio_rate{window}"
        f" > on(journey, sli) group_left() ({burn_rate!r} * mercato:slo_error_budget:ratio)"
    )


def _alert(alert: BurnAlert) -> list[str]:
    long_, short = _over(alert.long_window, alert.burn_rate), _over(alert.short_window, alert.burn_rate)
    expr = f"({long_}) and on(journey, sli) ({short})"
    share = f"{alert.budget_share:.0%}"
    what = "{{ $labels.journey }} {{ $labels.sli }}"
    rate = f"{alert.burn_rate:g}x"
    summary = f"{what} SLO burning its error budget at {rate}"
    description = (
        f"The {what} error ratio is over {rate} its budget in the last {alert.long_window} and "
        f"{alert.short_window} (now {{{{ $value | humanizePercentage }}}} over {alert.long_window}); "
        f"at this rate {share} of the 30-day budget is gone within {alert.long_window}."
    )
    return [
        f"    - alert: {alert.name}",
        f"      expr: {_quote(expr)}",
        f"      for: {alert.for_}",
        "      labels:",
        f"        severity: {alert.severity}",
        f"        burn_rate: '{alert.burn_rate:g}'",
        "      annotations:",
        f"        summary: {_quote(summary)}",
        f"        description: {_quote(description)}",
        "        runbook: 'docs/operations.md#slos-and-alerts'",
    ]


def render_rules() -> str:
    """`deploy/prometheus/rules/slos.rules.yml`, from `SLOS` and `ALERTS`."""
    out = [
        "# Generated by `mercato observability slo-rules` from src/mercato/cli/slo.py: edit that, not this.",
        "# SLOs of the shop's journeys: error ratios over 5m..3d and multi-window multi-burn-rate alerts",
        '# (Google SRE workbook, ch. 5). Targets and budgets: docs/operations.md, "SLOs and alerts".',
        "groups:",
    ]
    for slo in SLOS:
        out += [
            f"  - name: mercato-slo-{slo.journey}-{slo.sli}",
            "    rules:",
            *_recording(slo),
        ]
    out += ["  - name: mercato-slo-alerts", "    rules:"]
    for alert in ALERTS:
        out += _alert(alert)
    # Every worker counts the same table: `max`, not `sum`, across them.
    out += [
        "  - name: mercato-sagas",
        "    rules:",
        "    - alert: MercatoSagasStuck",
        "      expr: 'max by (saga_type, status) (mercato_saga_stuck) > 0'",
        "      for: 5m",
        "      labels:",
        "        severity: ticket",
        "      annotations:",
        "        summary: '{{ $value }} {{ $labels.saga_type }} sagas {{ $labels.status }} "
        "past their deadline'",
        "        description: 'Active sagas more than a minute past their deadline: no runner, a "
        "compensation parked on a breaker that stays open, or a runner losing its lease. "
        "List them: GET /admin/sagas.'",
        "        runbook: 'docs/operations.md#slos-and-alerts'",
    ]
    return "\n".join(out) + "\n"
