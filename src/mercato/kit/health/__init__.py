"""Liveness, readiness and startup probes."""

from mercato.kit.health.probes import CheckResult, HealthRegistry

__all__ = ["CheckResult", "HealthRegistry"]
