"""An OTLP receiver for tests, built on the official `opentelemetry-proto` service definitions.

It stands in for an OpenTelemetry Collector: OTLP/gRPC (`TraceService`, `MetricsService`,
`LogsService`) on one dynamic loopback port and OTLP/HTTP (`POST /v1/traces|metrics|logs`,
protobuf bodies, optionally gzip) on another. Every export request is decoded and recorded
with the transport it came over; tests read the records through thread-safe accessors and wait
on a condition instead of sleeping.
"""

from __future__ import annotations

import dataclasses
import gzip
import http.server
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

Transport = Literal["grpc", "http"]
Signal = Literal["traces", "metrics", "logs"]
Attributes = dict[str, Any]


def any_value(value: AnyValue) -> Any:
    """The Python value of an OTLP AnyValue."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(pairs: Any) -> Attributes:
    """OTLP key-value pairs as a dict."""
    return {pair.key: any_value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


@dataclass(frozen=True)
class Span:
    name: str
    kind: int
    resource: Attributes
    scope: str
    attributes: Attributes
    status: int = 0  # OTLP Status.code: 0 unset, 1 ok, 2 error
    span_id: str = ""  # hex


@dataclass(frozen=True)
class DataPoint:
    """One data point: `value` for gauges and sums; `count`/`total` for histograms."""

    attributes: Attributes
    time_unix_nano: int
    value: float | None = None
    count: int | None = None
    total: float | None = None


@dataclass(frozen=True)
class MetricRecord:
    name: str
    type: str
    unit: str
    resource: Attributes
    scope: str
    points: tuple[DataPoint, ...]


@dataclass(frozen=True)
class LogRecord:
    body: Any
    severity: str
    resource: Attributes


@dataclass(frozen=True)
class Export:
    """One export request as it arrived."""

    transport: Transport
    signal: Signal
    resources: tuple[Attributes, ...]
    spans: tuple[Span, ...] = ()
    metrics: tuple[MetricRecord, ...] = ()
    logs: tuple[LogRecord, ...] = ()
    content_encoding: str = ""


def _points(metric: Metric) -> tuple[str, tuple[DataPoint, ...]]:
    kind = metric.WhichOneof("data")
    if kind in ("gauge", "sum"):
        data = getattr(metric, kind)
        return kind, tuple(
            DataPoint(
                attributes(p.attributes),
                p.time_unix_nano,
                value=p.as_double if p.WhichOneof("value") == "as_double" else float(p.as_int),
            )
            for p in data.data_points
        )
    if kind in ("histogram", "exponential_histogram"):
        data = getattr(metric, kind)
        return kind, tuple(
            DataPoint(attributes(p.attributes), p.time_unix_nano, count=p.count, total=p.sum)
            for p in data.data_points
        )
    return kind or "", ()


def decode_traces(
    body: trace_service_pb2.ExportTraceServiceRequest, transport: Transport
) -> Export:
    resources, spans = [], []
    for rs in body.resource_spans:
        resource = attributes(rs.resource.attributes)
        resources.append(resource)
        for ss in rs.scope_spans:
            scope = ss.scope.name
            spans += [
                Span(
                    s.name,
                    s.kind,
                    resource,
                    scope,
                    attributes(s.attributes),
                    s.status.code,
                    s.span_id.hex(),
                )
                for s in ss.spans
            ]
    return Export(transport, "traces", tuple(resources), spans=tuple(spans))


def decode_metrics(
    body: metrics_service_pb2.ExportMetricsServiceRequest, transport: Transport
) -> Export:
    resources, metrics = [], []
    for rm in body.resource_metrics:
        resource = attributes(rm.resource.attributes)
        resources.append(resource)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind, points = _points(m)
                metrics.append(MetricRecord(m.name, kind, m.unit, resource, sm.scope.name, points))
    return Export(transport, "metrics", tuple(resources), metrics=tuple(metrics))


def decode_logs(body: logs_service_pb2.ExportLogsServiceRequest, transport: Transport) -> Export:
    resources, logs = [], []
    for rl in body.resource_logs:
        resource = attributes(rl.resource.attributes)
        resources.append(resource)
        for sl in rl.scope_logs:
            logs += [
                LogRecord(any_value(r.body), r.severity_text, resource) for r in sl.log_records
            ]
    return Export(transport, "logs", tuple(resources), logs=tuple(logs))


# signal -> (request message, decoder, response message)
_HTTP_ROUTES: dict[str, tuple[Signal, type[Any], Callable[[Any, Transport], Export], type[Any]]] = {
    "/v1/traces": (
        "traces",
        trace_service_pb2.ExportTraceServiceRequest,
        decode_traces,
        trace_service_pb2.ExportTraceServiceResponse,
    ),
    "/v1/metrics": (
        "metrics",
        metrics_service_pb2.ExportMetricsServiceRequest,
        decode_metrics,
        metrics_service_pb2.ExportMetricsServiceResponse,
    ),
    "/v1/logs": (
        "logs",
        logs_service_pb2.ExportLogsServiceRequest,
        decode_logs,
        logs_service_pb2.ExportLogsServiceResponse,
    ),
}


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self._receiver.record(decode_traces(request, "grpc"))
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self._receiver.record(decode_metrics(request, "grpc"))
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _LogsService(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self._receiver.record(decode_logs(request, "grpc"))
        return logs_service_pb2.ExportLogsServiceResponse()


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HttpServer

    def do_POST(self) -> None:
        route = _HTTP_ROUTES.get(self.path.split("?", 1)[0])
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if route is None:
            self._answer(404, b"", "text/plain")
            return
        _, message_type, decode, response_type = route
        encoding = (self.headers.get("Content-Encoding") or "").strip().lower()
        try:
            if encoding == "gzip":
                raw = gzip.decompress(raw)
            elif encoding == "deflate":
                raw = zlib.decompress(raw)
            elif encoding not in ("", "identity"):
                self._answer(415, b"", "text/plain")
                return
            message = message_type()
            message.ParseFromString(raw)
        except Exception:
            self._answer(400, b"", "text/plain")
            return
        export = decode(message, "http")
        self.server.receiver.record(dataclasses.replace(export, content_encoding=encoding))
        self._answer(200, response_type().SerializeToString(), "application/x-protobuf")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the records are what tests look at."""


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    receiver: OtlpReceiver


@dataclass
class OtlpReceiver:
    """A collector stand-in: start(), then point exporters at `grpc_endpoint`/`http_endpoint`."""

    host: str = "127.0.0.1"
    _exports: list[Export] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _grpc: Any = None
    _http: _HttpServer | None = None
    _http_thread: threading.Thread | None = None
    grpc_port: int = 0
    http_port: int = 0

    def start(self) -> OtlpReceiver:
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._grpc)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _MetricsService(self), self._grpc
        )
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsService(self), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"{self.host}:0")
        self._grpc.start()
        self._http = _HttpServer((self.host, 0), _HttpHandler)
        self._http.receiver = self
        self.http_port = int(self._http.server_address[1])
        self._http_thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._http_thread.start()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None).wait()
            self._grpc = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
            self._http_thread = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def grpc_endpoint(self) -> str:
        """`host:port` without a scheme: tests decide how the user writes it."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"{self.host}:{self.http_port}"

    def record(self, export: Export) -> None:
        with self._changed:
            self._exports.append(export)
            self._changed.notify_all()

    def exports(
        self, signal: Signal | None = None, transport: Transport | None = None
    ) -> list[Export]:
        """A snapshot of what arrived, in arrival order."""
        with self._changed:
            return [
                e
                for e in self._exports
                if (signal is None or e.signal == signal)
                and (transport is None or e.transport == transport)
            ]

    def spans(self, transport: Transport | None = None) -> list[Span]:
        return [s for e in self.exports("traces", transport) for s in e.spans]

    def metrics(
        self, name: str | None = None, transport: Transport | None = None
    ) -> list[MetricRecord]:
        return [
            m
            for e in self.exports("metrics", transport)
            for m in e.metrics
            if name is None or m.name == name
        ]

    def logs(self, transport: Transport | None = None) -> list[LogRecord]:
        return [r for e in self.exports("logs", transport) for r in e.logs]

    def transports(self) -> set[Transport]:
        return {e.transport for e in self.exports()}

    def wait_for(self, predicate: Callable[[OtlpReceiver], bool], timeout: float) -> bool:
        """Block until `predicate(self)` holds (re-checked on every new export) or time runs out."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                # the predicate takes the (re-entrant) lock through the accessors
                if predicate(self):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)


def latest_cumulative(records: list[MetricRecord]) -> Iterator[DataPoint]:
    """The newest point per (resource, attribute set): the running total of a cumulative metric."""
    newest: dict[tuple[Any, ...], DataPoint] = {}
    for record in records:
        for point in record.points:
            key = (
                tuple(sorted((k, repr(v)) for k, v in record.resource.items())),
                tuple(sorted((k, repr(v)) for k, v in point.attributes.items())),
            )
            if key not in newest or point.time_unix_nano >= newest[key].time_unix_nano:
                newest[key] = point
    yield from newest.values()
