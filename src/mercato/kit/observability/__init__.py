"""Structured logs, Prometheus metrics, OpenTelemetry traces and the request context they share."""

from mercato.kit.observability.context import current_request_id, request_id_var
from mercato.kit.observability.logging import configure_logging, get_logger
from mercato.kit.observability.metrics import HttpMetrics, register_pool_gauges, register_process_collectors
from mercato.kit.observability.tracing import (
    build_tracer_provider,
    carrier_of,
    context_from,
    fastapi_native_tracing_off,
    in_trace,
    install_tracer_provider,
    instrument_engine,
    message_spans,
    start_process_tracing,
    trace_carrier,
    tracer,
)

__all__ = [
    "HttpMetrics",
    "build_tracer_provider",
    "carrier_of",
    "configure_logging",
    "context_from",
    "current_request_id",
    "fastapi_native_tracing_off",
    "get_logger",
    "in_trace",
    "install_tracer_provider",
    "instrument_engine",
    "message_spans",
    "register_pool_gauges",
    "register_process_collectors",
    "request_id_var",
    "start_process_tracing",
    "trace_carrier",
    "tracer",
]
