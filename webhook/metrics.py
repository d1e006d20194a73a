"""Prometheus metrics. Under `serve` every worker and the watcher process write to
PROMETHEUS_MULTIPROC_DIR (set before they start) and `/metrics` aggregates all of them."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

ADMISSIONS = Counter(
    "locust_webhook_admissions_total",
    "Admission reviews answered, by outcome (patched, unchanged, skipped, denied, "
    "failed_open) and reason",
    ["outcome", "reason"],
)
BAD_REQUESTS = Counter(
    "locust_webhook_bad_requests_total",
    "Requests refused before admission, by HTTP status",
    ["status"],
)
LATENCY = Histogram(
    "locust_webhook_admission_duration_seconds",
    "Time spent answering one admission review (inside the server)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
_admissions: dict[tuple[str, str], Counter] = {}


def admitted(outcome: str, reason: str, seconds: float) -> None:
    """Count one admission and its duration (label lookups remembered: a handful of pairs)."""
    child = _admissions.get((outcome, reason))
    if child is None:
        child = _admissions[(outcome, reason)] = ADMISSIONS.labels(outcome, reason)
    child.inc()
    LATENCY.observe(seconds)


CACHE_SIZE = Gauge(
    "locust_webhook_locusttests_cached",
    "LocustTests cached (the most any process holds: the watcher process or a worker)",
    multiprocess_mode="livemax",
)
CACHE_SYNCED = Gauge(
    "locust_webhook_cache_synced",
    "1 once the watcher process has listed the LocustTests and every worker has its copy",
    multiprocess_mode="livemin",
)
WATCH_RESTARTS = Counter(
    "locust_webhook_watch_restarts_total",
    "LocustTest watch restarts, by reason (expired, error, closed)",
    ["reason"],
)
LOOKUPS = Counter(
    "locust_webhook_lookups_total",
    "LocustTest lookups, by result (cache_hit, direct_get, not_found, unavailable)",
    ["result"],
)
_lookups: dict[str, Counter] = {}


def looked_up(result: str) -> None:
    """Count one LocustTest lookup (label lookups remembered, as in `admitted`)."""
    child = _lookups.get(result)
    if child is None:
        child = _lookups[result] = LOOKUPS.labels(result)
    child.inc()


# livemax: the watcher process imports this module too, and holds this gauge at 0 (it serves
# nothing); the workers all load the same files (one forked late, from the pair the master
# took up just before), so they differ only for the moment a reload takes (a rejected one is
# counted in CERT_RELOADS).
CERT_EXPIRY = Gauge(
    "locust_webhook_certificate_expiry_timestamp_seconds",
    "notAfter of the serving certificate, as a Unix timestamp",
    multiprocess_mode="livemax",
)
CERT_RELOADS = Counter(
    "locust_webhook_certificate_reloads_total",
    "Serving certificate reloads, by result (loaded, rejected)",
    ["result"],
)


def render() -> tuple[bytes, str]:
    """The exposition text for `/metrics`, aggregated over workers when running under gunicorn."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
