"""Liveness, readiness and startup probes."""

from mercato.kit.health.drain import Drain
from mercato.kit.health.probes import CheckResult, Degraded, HealthRegistry, overall_status

__all__ = ["CheckResult", "Degraded", "Drain", "HealthRegistry", "overall_status"]
