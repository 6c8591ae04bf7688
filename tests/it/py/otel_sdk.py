"""Drives an agent with the OpenTelemetry Python SDK and its OTLP exporters (gRPC and HTTP/protobuf).

Usage: otel_sdk.py GRPC_ENDPOINT HTTP_ENDPOINT ROUNDS. Each exporter gets the same instruments, told apart by the
attribute `transport`: gRPC with cumulative temporality (the SDK's default), HTTP with delta temporality for counters
and histograms. Prints what was recorded as `name=value` words.
"""
import sys
import time

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View

grpc_endpoint, http_endpoint, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])

providers = []
for transport, exporter in [
    ("grpc", GrpcExporter(endpoint=grpc_endpoint, insecure=True)),
    # gzip, as the Collector's otlphttp exporter sends by default.
    (
        "http",
        HttpExporter(
            endpoint=http_endpoint + "/v1/metrics",
            compression=Compression.Gzip,
            preferred_temporality={
                Counter: AggregationTemporality.DELTA,
                Histogram: AggregationTemporality.DELTA,
            },
        ),
    ),
]:
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=500)
    # One histogram with exponential buckets (a view), one with the SDK's default explicit buckets.
    view = View(instrument_name="otel.size", aggregation=ExponentialBucketHistogramAggregation())
    provider = MeterProvider(metric_readers=[reader], views=[view])
    meter = provider.get_meter("strobe-test")
    providers.append((transport, provider, meter))

records = 0
for transport, provider, meter in providers:
    requests = meter.create_counter("otel.requests")
    inflight = meter.create_up_down_counter("otel.inflight")
    duration = meter.create_histogram("otel.duration", unit="s")
    size = meter.create_histogram("otel.size", unit="By")
    for i in range(rounds):
        requests.add(1, {"transport": transport, "route": "/a"})
        inflight.add(1, {"transport": transport})
        duration.record(0.2, {"transport": transport})
        size.record(1000 + i, {"transport": transport})
        if i % 10 == 9:
            time.sleep(0.05)
    inflight.add(-3, {"transport": transport})
for _, provider, _ in providers:
    provider.force_flush()
    provider.shutdown()
print(f"requests={rounds} inflight={rounds - 3} records={rounds} size_max={1000 + rounds - 1}")
