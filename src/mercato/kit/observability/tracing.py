"""OpenTelemetry traces: a provider with a configurable exporter, and a span per DB statement."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Tracer
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

_SPAN_KEY = "_mercato_otel_span"


def build_tracer_provider(
    *,
    service_name: str,
    exporter: str,
    sample_ratio: float = 1.0,
    otlp_endpoint: str = "",
    span_exporter: SpanExporter | None = None,
) -> TracerProvider | None:
    """A provider for `exporter` (none | console | otlp | memory); `None` when tracing is off.

    `memory` needs the caller's `span_exporter` (tests pass an InMemorySpanExporter).
    """
    if exporter == "none":
        return None
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    if exporter == "memory":
        if span_exporter is None:
            raise ValueError("the memory exporter needs a span_exporter")
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    elif exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    else:
        raise ValueError(f"unknown trace exporter {exporter!r}")
    return provider


def instrument_engine(engine: AsyncEngine, tracer: Tracer) -> None:
    """Open a client span around every statement the engine sends (semantic conventions: db.*)."""
    sync_engine = engine.sync_engine
    system = "postgresql" if engine.dialect.name == "postgresql" else engine.dialect.name
    db_name = engine.url.database or ""

    @event.listens_for(sync_engine, "before_cursor_execute")
    def _before(
        conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _executemany: bool
    ) -> None:
        operation = statement.lstrip().split(" ", 1)[0].upper()
        span = tracer.start_span(
            f"{operation} {db_name}".strip(),
            kind=SpanKind.CLIENT,
            attributes={
                "db.system": system,
                "db.name": db_name,
                "db.operation": operation,
                "db.statement": statement[:2000],
            },
        )
        if context is not None:
            setattr(context, _SPAN_KEY, span)

    @event.listens_for(sync_engine, "after_cursor_execute")
    def _after(
        conn: Any, _cursor: Any, _statement: str, _params: Any, context: Any, _executemany: bool
    ) -> None:
        span = getattr(context, _SPAN_KEY, None)
        if span is not None:
            span.end()
            setattr(context, _SPAN_KEY, None)

    @event.listens_for(sync_engine, "handle_error")
    def _error(exception_context: Any) -> None:
        context = exception_context.execution_context
        span = getattr(context, _SPAN_KEY, None) if context is not None else None
        if span is not None:
            span.record_exception(exception_context.original_exception)
            span.end()
            setattr(context, _SPAN_KEY, None)
