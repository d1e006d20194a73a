"""`/metrics` under `serve`: each worker writes its own files in PROMETHEUS_MULTIPROC_DIR and
whichever worker answers `/metrics` reports all of them together."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fixtures import locusttest, operator_pod
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families
from server_process import Server, serve

ADMISSIONS = "locust_webhook_admissions_total"
ADMISSION_DURATIONS = "locust_webhook_admission_duration_seconds_count"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """`serve --locusttests` with 2 workers and a metrics directory of the test's own."""
    tmp = tmp_path_factory.mktemp("metrics")
    locusttests = tmp / "locusttests"
    locusttests.mkdir()
    otel = {"enabled": True, "endpoint": "http://otel-collector:4317"}
    (locusttests / "demo.yaml").write_text(yaml.safe_dump(locusttest("demo", otel=otel)))
    metrics_dir = tmp / "metrics"
    metrics_dir.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with serve(tmp, "--locusttests", str(locusttests), "--workers", "2", env=env) as server:
        yield server, metrics_dir


def total(text: str, sample: str) -> float:
    """The sum of `sample` over its label sets in an exposition text."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample
    )


def admissions_written_by(metrics_dir: Path, pid: int) -> float:
    """The admissions one process has counted in its own file."""
    files = [str(path) for path in metrics_dir.glob(f"counter_{pid}.db")]
    return sum(
        s.value
        for family in MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call]
        for s in family.samples
        if s.name == ADMISSIONS
    )


def test_admissions_are_counted_whichever_worker_served_them(
    served: tuple[Server, Path],
) -> None:
    server, metrics_dir = served
    workers = server.workers(2)
    before = server.metrics()
    sent = 0
    # Each admission on a connection of its own: the kernel spreads them over the workers.
    while not all(admissions_written_by(metrics_dir, pid) for pid in workers):
        assert sent < 200, "one worker served every admission"
        server.admit(operator_pod("demo", "worker"))
        sent += 1
    after = server.metrics()
    assert total(after, ADMISSIONS) - total(before, ADMISSIONS) == sent
    assert total(after, ADMISSION_DURATIONS) - total(before, ADMISSION_DURATIONS) == sent


def test_cache_synced_once_the_directory_is_read(served: tuple[Server, Path]) -> None:
    server, _ = served
    assert "locust_webhook_cache_synced 1.0" in server.metrics()


def test_cache_synced_is_0_while_one_worker_waits_for_its_copy(
    served: tuple[Server, Path],
) -> None:
    """A worker gunicorn has just forked (from a cluster: until the watcher process has sent it
    the LocustTests) says 0: /metrics says 0 until it has its copy or is gone."""
    server, metrics_dir = served
    waiting = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; from webhook import metrics; "
            "metrics.CACHE_SYNCED.set(0); print(os.getpid())",
        ],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
        capture_output=True,
        text=True,
        check=True,
    )
    try:
        assert "locust_webhook_cache_synced 0.0" in server.metrics()
    finally:
        # What the master does when a worker exits (webhook.watcher.forget_process).
        mark_process_dead(int(waiting.stdout), str(metrics_dir))  # type: ignore[no-untyped-call]
    assert "locust_webhook_cache_synced 1.0" in server.metrics()


def test_serve_removes_the_metrics_directory_it_made_and_keeps_a_given_one(
    tmp_path: Path,
) -> None:
    locusttests = tmp_path / "locusttests"
    locusttests.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with serve(tmp_path, "--locusttests", str(locusttests), env={"TMPDIR": str(scratch)}):
        made = list(scratch.glob("locust-webhook-metrics-*"))
        assert len(made) == 1
        assert list(made[0].glob("*.db"))  # the workers' values
    assert not made[0].exists()
    given = tmp_path / "given"
    given.mkdir()
    env = {"TMPDIR": str(scratch), "PROMETHEUS_MULTIPROC_DIR": str(given)}
    with serve(tmp_path, "--locusttests", str(locusttests), env=env):
        assert list(given.glob("*.db"))
        assert not list(scratch.glob("locust-webhook-metrics-*"))  # none of its own
    assert list(given.glob("*.db"))
