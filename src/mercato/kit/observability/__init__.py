"""Structured logs, Prometheus metrics, OpenTelemetry traces and the request context they share."""

from mercato.kit.observability.context import current_request_id, request_id_var
from mercato.kit.observability.logging import configure_logging, get_logger
from mercato.kit.observability.metrics import HttpMetrics, register_pool_gauges
from mercato.kit.observability.tracing import build_tracer_provider, instrument_engine

__all__ = [
    "HttpMetrics",
    "build_tracer_provider",
    "configure_logging",
    "current_request_id",
    "get_logger",
    "instrument_engine",
    "register_pool_gauges",
    "request_id_var",
]
