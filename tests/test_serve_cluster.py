"""`locust-webhook serve` reading LocustTests from a Kubernetes API over its real protocol
(the local FakeKubeAPI: list, chunked watch streams, bookmarks, 410, bearer token, TLS)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures import locusttest, operator_pod
from kubeapi import FakeKubeAPI
from server_process import Server, serve

OTEL = {"enabled": True, "endpoint": "http://otel-collector:4317"}


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met in time")


def patch_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    return list(json.loads(base64.b64decode(response["patch"]))) if "patch" in response else []


def readyz(server: Server) -> int:
    conn = http.client.HTTPSConnection(
        "localhost", server.port, context=server.ssl_context(), timeout=5
    )
    try:
        conn.request("GET", "/readyz")
        answer = conn.getresponse()
        answer.read()
        return answer.status
    finally:
        conn.close()


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as running:
        yield running


def cluster_env(api: FakeKubeAPI, tmp_path: Path) -> dict[str, str]:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    return {"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": ""}


def test_locusttests_created_and_changed_after_start_are_used(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    api.create(locusttest("early", otel=OTEL))
    with serve(tmp_path, "--workers", "2", env=cluster_env(api, tmp_path)) as server:
        assert "--otel" in json.dumps(patch_of(server.admit(operator_pod("early", "worker"))))
        api.create(locusttest("late", "team-a"))
        wait_until(
            lambda: (
                "initContainers"
                in json.dumps(patch_of(server.admit(operator_pod("late", "master"), "team-a")))
            )
        )
        api.update(locusttest("late", "team-a", otel=OTEL))
        wait_until(
            lambda: (
                "--otel"
                in json.dumps(patch_of(server.admit(operator_pod("late", "master"), "team-a")))
            )
        )
        api.delete("team-a", "late")
        wait_until(
            lambda: (
                "not found"
                in " ".join(
                    server.admit(operator_pod("late", "master"), "team-a").get("warnings", [])
                )
            )
        )
        assert all(r.headers.get("authorization") == f"Bearer {api.token}" for r in api.requests)


@contextlib.contextmanager
def serve_with_metrics_dir(api: FakeKubeAPI, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    """`serve` with 2 workers, one LocustTest and a metrics directory of the test's own, once
    both workers have their copy."""
    api.create(locusttest("early", otel=OTEL))
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {**cluster_env(api, tmp_path), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with serve(tmp_path, "--workers", "2", env=env) as server:
        wait_until(lambda: server.copies_received() == 2)
        yield server, metrics_dir


def test_metrics_are_the_workers_and_the_watchers_alone(api: FakeKubeAPI, tmp_path: Path) -> None:
    """The master imports the workers' modules before forking; it must not write metrics of its
    own (its 0 would hold the `livemin` gauge cache_synced at 0 for good)."""
    with serve_with_metrics_dir(api, tmp_path) as (server, metrics_dir):
        assert "locust_webhook_cache_synced 1.0" in server.metrics()
        assert "locust_webhook_locusttests_cached 1.0" in server.metrics()
        writers = {int(path.stem.rsplit("_", 1)[1]) for path in metrics_dir.glob("*.db")}
        assert writers == server.workers(2) | {server.watcher()}


def test_a_dead_worker_or_watcher_leaves_no_live_gauges(api: FakeKubeAPI, tmp_path: Path) -> None:
    """The live gauges (cache_synced, cache size, certificate expiry) of an exited process are
    dropped when gunicorn or `serve` restarts it: a dead process's values would stay in
    /metrics for good."""
    with serve_with_metrics_dir(api, tmp_path) as (server, metrics_dir):
        worker, watcher = min(server.workers(2)), server.watcher()
        for pid in (worker, watcher):
            assert list(metrics_dir.glob(f"gauge_live*_{pid}.db"))
            os.kill(pid, signal.SIGKILL)
        # The new worker gets its copy from the new watcher.
        wait_until(lambda: server.copies_received() == 3, timeout=30)
        for pid in (worker, watcher):
            assert not list(metrics_dir.glob(f"gauge_live*_{pid}.db"))
        assert "locust_webhook_cache_synced 1.0" in server.metrics()


def test_lagging_watch_is_covered_by_a_direct_get(api: FakeKubeAPI, tmp_path: Path) -> None:
    with serve(tmp_path, "--workers", "1", env=cluster_env(api, tmp_path)) as server:
        api.lag = 30.0
        api.create(locusttest("fresh", otel=OTEL))
        response = server.admit(operator_pod("fresh", "worker"))
        assert "--otel" in json.dumps(patch_of(response))


def test_expired_watch_relists_and_keeps_serving(api: FakeKubeAPI, tmp_path: Path) -> None:
    api.create(locusttest("stable"))
    with serve(tmp_path, "--workers", "1", env=cluster_env(api, tmp_path)) as server:
        lists_before = len(api.lists())
        # While the API is away, history moves on and is compacted: the watch's
        # resourceVersion is gone when it comes back (410 Expired), so it must re-list.
        api.stop()
        api.create(locusttest("after-relist", otel=OTEL))
        api.delete("default", "stable")
        api.create(locusttest("stable"))
        api.compact()
        api.start()
        wait_until(lambda: len(api.lists()) > lists_before)
        wait_until(
            lambda: (
                "--otel"
                in json.dumps(patch_of(server.admit(operator_pod("after-relist", "worker"))))
            )
        )
        assert "initContainers" in json.dumps(
            patch_of(server.admit(operator_pod("stable", "master")))
        )


def test_api_down_at_start_fails_open_until_the_first_list(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    api.create(locusttest("waiting", otel=OTEL))
    env = cluster_env(api, tmp_path)
    api.stop()
    with serve(
        tmp_path, "--workers", "1", "--lookup-timeout", "0.5", env=env, ready=False
    ) as server:
        wait_until(lambda: _answers(server))
        assert readyz(server) == 503
        response = server.admit(operator_pod("waiting", "worker"))
        assert response["allowed"] is True and "patch" not in response
        assert "could not be read" in response["warnings"][0]
        api.start()
        wait_until(lambda: readyz(server) == 200, timeout=45)
        assert "--otel" in json.dumps(patch_of(server.admit(operator_pod("waiting", "worker"))))
        api.stop()
        # The last known state keeps serving through an outage.
        assert "--otel" in json.dumps(patch_of(server.admit(operator_pod("waiting", "master"))))
        assert readyz(server) == 200


def _answers(server: Server) -> bool:
    try:
        readyz(server)
    except OSError:
        return False
    return True


def test_one_list_and_watch_per_pod_whatever_the_workers(api: FakeKubeAPI, tmp_path: Path) -> None:
    api.create(locusttest("shared", otel=OTEL))
    with serve(tmp_path, "--workers", "3", env=cluster_env(api, tmp_path)) as server:
        wait_until(lambda: server.copies_received() == 3)
        for role in ("master", "worker"):
            assert "--otel" in json.dumps(patch_of(server.admit(operator_pod("shared", role))))
        assert len(server.workers(3)) == 3
        assert (len(api.lists()), len(api.watches())) == (1, 1)


def test_a_watcher_that_dies_is_restarted_while_the_workers_serve_their_copy(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    api.create(locusttest("before", otel=OTEL))
    with serve(tmp_path, "--workers", "2", env=cluster_env(api, tmp_path)) as server:
        wait_until(lambda: server.copies_received() == 2)
        first = server.watcher()
        os.kill(first, signal.SIGKILL)
        # The workers answer from their copy meanwhile, and stay ready.
        for _ in range(4):
            assert "--otel" in json.dumps(patch_of(server.admit(operator_pod("before", "worker"))))
            assert readyz(server) == 200
        wait_until(lambda: "the LocustTest watcher process exited" in server.log())
        wait_until(lambda: _watcher_other_than(server, first))
        api.create(locusttest("after", otel=OTEL))
        wait_until(
            lambda: "--otel" in json.dumps(patch_of(server.admit(operator_pod("after", "worker"))))
        )
        assert "Traceback" not in server.log()


def _watcher_other_than(server: Server, pid: int) -> bool:
    try:
        return server.watcher() != pid
    except ValueError:  # none at the moment
        return False


def test_sigterm_stops_the_watcher_and_removes_its_socket(api: FakeKubeAPI, tmp_path: Path) -> None:
    with serve(tmp_path, "--workers", "1", env=cluster_env(api, tmp_path)) as server:
        watcher = server.watcher()
        arguments = server.children()[watcher].split("\0")
        socket_path = Path(arguments[arguments.index("--socket") + 1])
        assert socket_path.is_socket()
    assert server.process.returncode == 0
    assert not Path(f"/proc/{watcher}").exists()
    assert not socket_path.parent.exists()
