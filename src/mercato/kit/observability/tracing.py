"""OpenTelemetry traces: a provider with a configurable exporter, W3C context carried across every hop,
and a span per DB statement.

One checkout is one trace (concept 35): the API's server span (child of the client's `traceparent`),
the outbox row and the stream message (their CloudEvents envelope carries `traceparent`/`tracestate`,
the CloudEvents distributed-tracing extension), the saga's steps in the worker (the saga row keeps the
context it was started in), the provider calls (`traceparent` header) and the simulators' server
spans, and every consumer or projection that handles the order's events.

Each process installs its provider once (`install_tracer_provider`); the hops use the global tracer
(`tracer()`), which is a no-op until then, so code that runs untraced pays nothing but a branch.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

_SPAN_KEY = "_mercato_otel_span"
TRACER_NAME = "mercato"
# The W3C Trace Context fields, as HTTP headers and as CloudEvents extension attributes.
TRACE_FIELDS = ("traceparent", "tracestate")


def tracer() -> Tracer:
    """The process's tracer: a no-op until `install_tracer_provider` ran in this process."""
    return trace.get_tracer(TRACER_NAME)


def install_tracer_provider(provider: TracerProvider) -> None:
    """Make `provider` the process's global one (once per process: later calls are ignored by the API)."""
    trace.set_tracer_provider(provider)


def trace_carrier() -> dict[str, str]:
    """The current span's W3C context (`traceparent`, `tracestate` when set); empty when none is active."""
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(carrier)
    return {k: v for k, v in carrier.items() if k in TRACE_FIELDS}


def carrier_of(span: trace.Span) -> dict[str, str]:
    """`span`'s W3C context as a carrier (for a message sent on its behalf after it ends, too)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return {k: v for k, v in carrier.items() if k in TRACE_FIELDS}


def context_from(carrier: Mapping[str, Any] | None) -> otel_context.Context | None:
    """The remote parent a carrier names (HTTP headers, message headers, a saga's `_trace`), or None."""
    if not carrier or "traceparent" not in carrier:
        return None
    fields = {k: str(carrier[k]) for k in TRACE_FIELDS if k in carrier}
    ctx = propagate.extract(fields)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


@contextmanager
def message_spans(
    name: str, carriers: Iterable[Mapping[str, Any]], attributes: Mapping[str, str] | None = None
) -> Iterator[None]:
    """A consumer span per traced message (each the child of its message's context) around the work
    that handles them together (a projection's batch, one inbox transaction). An error ends them
    all as failed and propagates."""
    spans = []
    for carrier in carriers:
        parent = context_from(carrier)
        if parent is not None:
            spans.append(
                tracer().start_span(name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes)
            )
    if not spans:
        yield
        return
    token = otel_context.attach(trace.set_span_in_context(spans[0])) if len(spans) == 1 else None
    try:
        yield
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        if token is not None:
            otel_context.detach(token)
        for span in spans:
            span.end()


def in_trace() -> bool:
    return trace.get_current_span().get_span_context().is_valid


def process_resource(service_name: str, role: str) -> dict[str, str | int]:
    """Resource attributes naming the process a span came from (the test of concept 35 reads them)."""
    return {"service.name": service_name, "mercato.role": role, "process.pid": os.getpid()}


def build_tracer_provider(
    *,
    service_name: str,
    exporter: str,
    sample_ratio: float = 1.0,
    otlp_endpoint: str = "",
    span_exporter: SpanExporter | None = None,
    role: str = "",
) -> TracerProvider | None:
    """A provider for `exporter` (none | console | otlp | memory); `None` when tracing is off.

    `memory` needs the caller's `span_exporter` (tests pass an InMemorySpanExporter).
    """
    if exporter == "none":
        return None
    provider = TracerProvider(
        resource=Resource.create(process_resource(service_name, role or service_name)),
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


def fastapi_native_tracing_off() -> dict[str, Any]:
    """`FastAPI(**this)`: no span of FastAPI's own (0.160+ traces natively through the global provider).

    Our edge middleware already opens the server span, outermost (the gateway's request context, the
    simulators' edge): a second one, its sibling under the same remote parent, would split the tree."""
    from fastapi import FastAPI

    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    return {}


def start_process_tracing(
    *, service_name: str, role: str, exporter: str, sample_ratio: float = 1.0, otlp_endpoint: str = ""
) -> TracerProvider | None:
    """Build the process's provider for `exporter` (none | console | otlp) and install it; None when off.

    The caller shuts it down on exit, which exports the spans the batch processor still holds."""
    if exporter == "memory":
        raise ValueError("the memory exporter is for tests, which pass their own span exporter")
    provider = build_tracer_provider(
        service_name=service_name,
        exporter=exporter,
        sample_ratio=sample_ratio,
        otlp_endpoint=otlp_endpoint,
        role=role,
    )
    if provider is not None:
        install_tracer_provider(provider)
    return provider


def instrument_engine(engine: AsyncEngine, tracer: Tracer, *, only_in_trace: bool = False) -> None:
    """Open a client span around every statement the engine sends (semantic conventions: db.*).

    `only_in_trace`: statements outside any trace get no span (a worker's idle polling would
    otherwise start a new one-span trace several times a second)."""
    sync_engine = engine.sync_engine
    system = "postgresql" if engine.dialect.name == "postgresql" else engine.dialect.name
    db_name = engine.url.database or ""

    @event.listens_for(sync_engine, "before_cursor_execute")
    def _before(
        conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _executemany: bool
    ) -> None:
        if only_in_trace and not in_trace():
            return
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
