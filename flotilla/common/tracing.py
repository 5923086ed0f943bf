"""OpenTelemetry tracing: off by default, one setting turns it on for every service.

    observability.tracing: true
    observability.trace_exporter: otlp | console | file
    observability.otlp_endpoint: 127.0.0.1:4317      (otlp)

A request's trace: the router's span, the batcher's span for the request
(its child, through W3C ``traceparent`` metadata). A batch is one span of
its own, linked to the span of every request that rode in it (each
``BatchItem`` carries its request's ``traceparent``), with the batch size,
the worker, the Triton replica and the model version as attributes; the
worker's ProcessBatch span and its backend call are children of the batch.

With tracing off the OpenTelemetry API is a no-op: no provider, no export.
``file`` writes one JSON object per span to ``<dir>/<service>.jsonl`` (what
the local stack's tests read); ``console`` prints them to stdout (the log).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind

from flotilla.config import ObservabilitySettings

TRACER_NAME = "flotilla"
TRACE_HEADERS = ("traceparent", "tracestate")

tracer = trace.get_tracer(TRACER_NAME)


def setup(settings: ObservabilitySettings, service: str, *, file_dir: Path | None = None) -> bool:
    """Install the tracer provider for this process; False when tracing is off."""
    if not settings.tracing:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"flotilla-{service}"}))
    if settings.trace_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=True))
        )
    else:
        if settings.trace_exporter == "file":
            directory = file_dir or Path(".")
            directory.mkdir(parents=True, exist_ok=True)
            out = open(directory / f"{service}.jsonl", "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        else:
            import sys

            out = sys.stdout
        exporter = ConsoleSpanExporter(out=out, formatter=lambda span: json.dumps(json.loads(span.to_json())) + "\n")
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    install(provider)
    return True


_installed = False


def install(provider: trace.TracerProvider) -> None:
    """Make ``provider`` this process's tracer provider: spans are recorded from now on."""
    global _installed
    trace.set_tracer_provider(provider)
    _installed = True


def enabled() -> bool:
    """Whether this process records spans (``install`` ran): without a provider, span work is skipped."""
    return _installed


use_span = trace.use_span


def span(
    name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, str | int] | None = None,
    links: Sequence[Link] = (),
) -> contextlib.AbstractContextManager[Span]:
    """A span of this process's work, current inside the block. With tracing off a non-recording
    span and no OpenTelemetry work: the API's no-op tracer still builds a context per span
    (~4.7 against ~0.5 µs per span and propagation here)."""
    if not _installed:
        return contextlib.nullcontext(trace.INVALID_SPAN)
    return tracer.start_as_current_span(name, kind=kind, attributes=attributes, links=list(links))


def shutdown() -> None:
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def extract(metadata: Iterable[tuple[str, str | bytes]]) -> otel_context.Context:
    """The caller's trace context from gRPC metadata."""
    carrier = {k: v for k, v in metadata if k in TRACE_HEADERS and isinstance(v, str)}
    return propagate.extract(carrier)


def inject(metadata: Iterable[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """``metadata`` without any incoming trace headers, plus the current span's context."""
    kept = tuple((k, v) for k, v in metadata if k not in TRACE_HEADERS)
    if not _installed:
        return kept
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return kept + tuple(carrier.items())


def current_traceparent() -> str:
    """The current span's context as a W3C traceparent ('' with tracing off)."""
    if not _installed:
        return ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def links_from(traceparents: Iterable[str]) -> list[Link]:
    """Span links to the requests whose contexts these are (a batch's riders)."""
    if not _installed:
        return []
    links = []
    for traceparent in traceparents:
        if not traceparent:
            continue
        span_context = trace.get_current_span(propagate.extract({"traceparent": traceparent})).get_span_context()
        if span_context.is_valid:
            links.append(Link(span_context))
    return links


def server_span(name: str, metadata: Iterable[tuple[str, str | bytes]], attributes: Mapping[str, str]):  # type: ignore[no-untyped-def]
    """The span of a call this server handles, child of the caller's."""
    return tracer.start_as_current_span(
        name, context=extract(metadata), kind=SpanKind.SERVER, attributes=dict(attributes)
    )


def start_server_span(name: str, metadata: Iterable[tuple[str, str | bytes]], attributes: Mapping[str, str]) -> Span:
    """Like ``server_span`` for a call answered later: the caller ends the span (``span.end()``)."""
    return tracer.start_span(name, context=extract(metadata), kind=SpanKind.SERVER, attributes=dict(attributes))


def traceparent_of(span: Span) -> str:
    """``span``'s context as a W3C traceparent ('' with tracing off)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")
