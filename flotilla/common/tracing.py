"""OpenTelemetry tracing: off by default, one setting turns it on for every service.

    observability.tracing: true
    observability.trace_sample_ratio: 1.0             (fraction of traces kept)
    observability.trace_exporter: otlp | console | file
    observability.otlp_endpoint: 127.0.0.1:4317      (otlp)
    observability.otlp_insecure: true                 (false: TLS, otlp_certificate_file ...)

A request's trace: the router's span, the batcher's span for the request
(its child, through W3C ``traceparent`` metadata). A batch is one span of
its own, linked to the span of every request that rode in it (each
``BatchItem`` carries its request's ``traceparent``), with the batch size,
the worker, the Triton replica and the model version (the default one
resolved) as attributes; the worker's ProcessBatch span is a child of the
batch, and its image fetches, decode jobs and backend call are children of
that.

Sampling: a trace is kept or dropped where it starts (``trace_sample_ratio``
of trace ids) and every later tier follows the caller's decision; a batch,
which starts a trace of its own, is kept when any request riding in it is.
The mesh's own polling (``POLLING_METHODS``: the controller reading batcher
statistics, batchers re-registering, fleet watches, operators' reads) starts
no trace: it made more root traces than the requests did. It is traced
inside a caller's trace, or everywhere with ``trace_polling``.

With tracing off the OpenTelemetry API is a no-op: no provider, no export.
``file`` writes one JSON object per span to ``<dir>/<service>.jsonl`` (what
the local stack's tests read); ``console`` prints them to stdout (the log).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind

from flotilla.config import ObservabilitySettings

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from typing import TextIO

    import grpc
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.sampling import Sampler, SamplingResult
    from opentelemetry.trace import TraceState
    from opentelemetry.util.types import Attributes

TRACER_NAME = "flotilla"
TRACE_HEADERS = ("traceparent", "tracestate")
POLLING_METHODS = frozenset(
    {"GetStats", "ListStats", "GetPools", "GetBatching", "ShardHeartbeat", "WatchFleet", "ListModels", "GetModel"}
)
"""Reads the mesh and its operators repeat (shards' ShardHeartbeat every
second, fleet watches, ``flotilla top``): no trace of their own unless ``trace_polling``."""

tracer = trace.get_tracer(TRACER_NAME)


def setup(settings: ObservabilitySettings, service: str, *, file_dir: Path | None = None) -> bool:
    """Install the tracer provider for this process; False when tracing is off."""
    if not settings.tracing:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider(
        resource=Resource.create({"service.name": f"flotilla-{service}"}),
        sampler=sampler(settings.trace_sample_ratio),
    )
    if settings.trace_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        credentials = otlp_credentials(settings)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=settings.otlp_endpoint, insecure=credentials is None, credentials=credentials,
        )))
    else:
        if settings.trace_exporter == "file":
            directory = file_dir or Path(".")
            directory.mkdir(parents=True, exist_ok=True)
            out: TextIO = open(directory / f"{service}.jsonl", "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        else:
            import sys

            out = sys.stdout
        exporter = ConsoleSpanExporter(out=out, formatter=lambda span: json.dumps(json.loads(span.to_json())) + "\n")
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    install(provider, trace_polling=settings.trace_polling)
    return True


def sampler(ratio: float) -> Sampler:
    """Keep ``ratio`` of the traces that start here; follow the caller's decision otherwise. A span
    that starts a trace with links (a batch) is kept when any linked span (a rider) was."""
    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult, TraceIdRatioBased

    class _LinkedOrRatio(Sampler):
        def __init__(self) -> None:
            self.ratio = TraceIdRatioBased(ratio)

        def should_sample(
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Attributes = None,
            links: Sequence[Link] | None = None,
            trace_state: TraceState | None = None,
        ) -> SamplingResult:
            if links:
                sampled = any(link.context.trace_flags.sampled for link in links)
                return SamplingResult(Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP,
                                      attributes if sampled else None, trace_state)
            return self.ratio.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return f"LinkedOrRatio{{{ratio}}}"

    return ParentBased(root=_LinkedOrRatio())


def otlp_credentials(settings: ObservabilitySettings) -> grpc.ChannelCredentials | None:
    """TLS credentials for the OTLP exporter (None: plaintext, ``otlp_insecure``)."""
    if settings.otlp_insecure:
        return None
    import grpc

    def read(path: Path | None) -> bytes | None:
        return None if path is None else path.read_bytes()

    return grpc.ssl_channel_credentials(
        root_certificates=read(settings.otlp_certificate_file),
        private_key=read(settings.otlp_client_key_file),
        certificate_chain=read(settings.otlp_client_certificate_file),
    )


_installed = False
_trace_polling = False


def install(provider: trace.TracerProvider, *, trace_polling: bool = False) -> None:
    """Make ``provider`` this process's tracer provider: spans are recorded from now on.
    ``trace_polling``: polling calls start traces of their own too (``POLLING_METHODS``)."""
    global _installed, _trace_polling
    if trace.get_tracer_provider() is not provider:
        trace.set_tracer_provider(provider)
    _installed = True
    _trace_polling = trace_polling


def enabled() -> bool:
    """Whether this process records spans (``install`` ran): without a provider, span work is skipped."""
    return _installed


def traces_call(method: str, metadata: Iterable[tuple[str, str | bytes]]) -> bool:
    """Whether a server span is wanted for a call of ``method`` (tracing on; ``enabled()`` checked first):
    every call, except polling that no traced caller made (``POLLING_METHODS``, ``trace_polling``)."""
    if method not in POLLING_METHODS or _trace_polling:
        return True
    return any(key == "traceparent" for key, _ in metadata)


def current_context() -> otel_context.Context | None:
    """The current trace context, to parent spans on another thread (None with tracing off)."""
    return otel_context.get_current() if _installed else None


use_span = trace.use_span


def span(
    name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, str | int] | None = None,
    links: Sequence[Link] = (), context: otel_context.Context | None = None,
) -> contextlib.AbstractContextManager[Span]:
    """A span of this process's work, current inside the block; ``context``: its parent's, when the
    block runs where the current context is not (a thread pool). With tracing off a non-recording
    span and no OpenTelemetry work: the API's no-op tracer still builds a context per span
    (~4.7 against ~0.5 µs per span and propagation here)."""
    if not _installed:
        return contextlib.nullcontext(trace.INVALID_SPAN)
    return tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes, links=list(links))


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


def server_span(
    name: str, metadata: Iterable[tuple[str, str | bytes]], attributes: Mapping[str, str]
) -> AbstractContextManager[Span]:
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
