"""Client-side load balancing: round robin, least outstanding, power of two choices, and passive
outlier ejection (ADR 0039). No shop knowledge: the providers' HTTP client uses it for several
instances of one provider."""

from mercato.kit.balancing.balancer import Balancer, BalancerHooks, BalancerStats, Lease, Policy
from mercato.kit.balancing.metrics import PrometheusBalancerHooks
from mercato.kit.balancing.outlier import EjectionHooks, Outcome, OutlierDetector, OutlierSettings

__all__ = [
    "Balancer",
    "BalancerHooks",
    "BalancerStats",
    "EjectionHooks",
    "Lease",
    "Outcome",
    "OutlierDetector",
    "OutlierSettings",
    "Policy",
    "PrometheusBalancerHooks",
]
