"""`locust-webhook serve` reading LocustTests from a Kubernetes API over its real protocol
(the local FakeKubeAPI: list, chunked watch streams, bookmarks, 410, bearer token, TLS)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures import locusttest, operator_pod
from kubeapi import ROUTE, FakeKubeAPI
from server_process import Server, serve

from webhook.config import ServeSettings
from webhook.lookup import BACKOFF_START
from webhook.watcher import Watcher

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
        # The watcher serves no certificate: its 0 must not be what /metrics says.
        [expiry] = [
            float(line.split()[1])
            for line in server.metrics().splitlines()
            if line.startswith("locust_webhook_certificate_expiry_timestamp_seconds ")
        ]
        assert expiry > time.time() + 86400
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


def test_a_burst_of_pods_of_a_locusttest_missing_from_the_copy_is_injected_whole(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    """More pods than the worker lets look up LocustTests at once (half its 8 threads): they
    wait on the one lookup of their LocustTest, none is turned away."""
    env = cluster_env(api, tmp_path)
    with serve(tmp_path, "--workers", "1", "--threads", "8", env=env) as server:
        wait_until(lambda: server.copies_received() == 1)
        api.lag = 30.0
        api.create(locusttest("burst", otel=OTEL))
        api.latency = 0.5
        results: list[dict[str, Any]] = []

        def one() -> None:
            results.append(server.admit(operator_pod("burst", "worker")))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        assert len(results) == 8
        assert all("--otel" in json.dumps(patch_of(r)) for r in results), results


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


def test_sigterm_stops_the_watcher_and_leaves_nothing_in_tmpdir(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    """Its socket, the metrics, and the files the Kubernetes client writes for a kubeconfig's
    embedded certificates (and key) go when `serve` does."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**cluster_env(api, tmp_path), "TMPDIR": str(tmpdir)}
    with serve(tmp_path, "--workers", "1", env=env) as server:
        watcher = server.watcher()
        arguments = server.children()[watcher].split("\0")
        socket_path = Path(arguments[arguments.index("--socket") + 1])
        assert socket_path.is_socket()
        written = [path for path in tmpdir.rglob("*") if path.is_file()]
        assert any(b"BEGIN CERTIFICATE" in path.read_bytes() for path in written)
    assert server.process.returncode == 0
    assert not Path(f"/proc/{watcher}").exists()
    assert not socket_path.parent.exists()
    assert list(tmpdir.iterdir()) == []


def test_a_restarted_watcher_leaves_no_credentials_of_the_one_before(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    """Each watcher process writes the kubeconfig's CA to a temporary file it never deletes:
    a restart removes the files of the process before, so that restarts do not pile them up."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**cluster_env(api, tmp_path), "TMPDIR": str(tmpdir)}
    with serve(tmp_path, "--workers", "1", env=env) as server:
        for started in range(1, 4):
            os.kill(server.watcher(), signal.SIGKILL)
            wait_until(lambda n=started + 1: server.log().count("at the cluster scope") == n)
        written = [path for path in tmpdir.rglob("*") if path.is_file()]
        credentials = [path for path in written if b"BEGIN CERTIFICATE" in path.read_bytes()]
        assert len(credentials) == 1, credentials  # the running watcher's


def test_namespaces_are_listed_and_watched_alone(api: FakeKubeAPI, tmp_path: Path) -> None:
    """`--namespaces` goes with a namespace-scoped service account: the API is asked about
    those namespaces only (cluster-wide it would answer 403), and a LocustTest elsewhere is
    not used (its pods are told why)."""
    api.create(locusttest("inside", "team-a", otel=OTEL))
    api.create(locusttest("outside", "team-c", otel=OTEL))
    env = cluster_env(api, tmp_path)
    with serve(tmp_path, "--workers", "1", "--namespaces", "team-a,team-b", env=env) as server:
        inside = server.admit(operator_pod("inside", "worker"), "team-a")
        assert "--otel" in json.dumps(patch_of(inside))
        outside = server.admit(operator_pod("outside", "worker"), "team-c")
        assert "patch" not in outside
        assert outside["warnings"] == [
            "LocustTest team-c/outside: namespace team-c is not among the webhook's "
            "--namespaces: observability was not injected"
        ]
        wait_until(lambda: len(api.watches()) >= 2)
    scopes = {match["namespace"] for r in api.requests if (match := ROUTE.fullmatch(r.path))}
    assert scopes == {"team-a", "team-b"}
    assert len(api.lists()) == 2


def test_a_worker_that_exits_leaves_the_watcher_to_its_replacement(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    """A worker that exits (SIGTERM to it alone; gunicorn starts another) leaves through the
    same cleanup as `serve`: the watcher process and its socket belong to the master and
    must stay for the new worker."""
    api.create(locusttest("kept", otel=OTEL))
    with serve(tmp_path, "--workers", "1", env=cluster_env(api, tmp_path)) as server:
        wait_until(lambda: server.copies_received() == 1)
        (first,) = server.workers(1)
        watcher = server.watcher()
        os.kill(first, signal.SIGTERM)
        wait_until(lambda: server.copies_received() == 2)
        assert first not in server.workers(1)
        assert readyz(server) == 200
        assert "--otel" in json.dumps(patch_of(server.admit(operator_pod("kept", "worker"))))
        assert server.watcher() == watcher


def test_stop_terminates_the_watcher_process(
    api: FakeKubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve`'s shutdown asks the watcher process to leave (SIGTERM, which ends it at once)
    instead of waiting out the stop timeout and killing it."""
    for name, value in cluster_env(api, tmp_path).items():
        monkeypatch.setenv(name, value)
    watcher = Watcher(ServeSettings())
    watcher.start()
    process = watcher._process
    assert process is not None and process.stdin is not None and process.poll() is None
    with process.stdin:  # the pipe `serve` closes by exiting
        watcher.stop()
    assert process.returncode == -signal.SIGTERM


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie nobody reaped has finished)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_watcher_process_leaves_when_serve_is_killed(api: FakeKubeAPI, tmp_path: Path) -> None:
    """SIGKILL to `serve` (the OOM killer, a forced pod deletion) runs none of its cleanup:
    the watcher process notices that `serve` and its workers are gone and exits instead of
    watching the API for nobody."""
    with serve(tmp_path, "--workers", "1", env=cluster_env(api, tmp_path)) as server:
        watcher = server.watcher()
        arguments = server.children()[watcher].split("\0")
        feed_directory = Path(arguments[arguments.index("--socket") + 1]).parent
        try:
            server.process.kill()
            server.process.wait()
            wait_until(lambda: not _alive(watcher))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.process.pid, signal.SIGKILL)  # whatever is left of the group
            shutil.rmtree(feed_directory, ignore_errors=True)  # serve had no chance to


def test_a_watcher_that_failed_to_start_leaves_no_gauge_behind(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    """A watcher process that sets its gauges and then cannot watch (here: no kubeconfig) is
    forgotten like one that ran: its cache_synced 0 (a `livemin` gauge) would otherwise hold
    /metrics at 0 after the next watcher synced, an alert that never clears."""
    with serve_with_metrics_dir(api, tmp_path) as (server, metrics_dir):
        kubeconfig = tmp_path / "kubeconfig"
        saved = kubeconfig.read_bytes()
        kubeconfig.unlink()
        os.kill(server.watcher(), signal.SIGKILL)
        wait_until(lambda: server.log().count("cannot restart the LocustTest watcher") >= 2)
        kubeconfig.write_bytes(saved)
        wait_until(lambda: server.log().count("LocustTests at the cluster scope") == 2, timeout=30)
        wait_until(lambda: "locust_webhook_cache_synced 1.0" in server.metrics())
        live = {server.watcher(), *server.workers(2)}
        gauges = {path.name for path in metrics_dir.glob("gauge_livemin_*.db")}
        assert gauges == {f"gauge_livemin_{pid}.db" for pid in live}


def test_a_watcher_that_cannot_restart_is_retried_after_growing_pauses(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    """A watcher process that keeps failing is not restarted in a loop: each attempt waits
    about twice as long as the one before (from BACKOFF_START)."""
    env = cluster_env(api, tmp_path)
    with serve(tmp_path, "--workers", "1", env=env) as server:
        Path(env["KUBECONFIG"]).unlink()  # every new watcher process now fails at once
        killed = time.monotonic()
        os.kill(server.watcher(), signal.SIGKILL)
        attempts = 5
        wait_until(
            lambda: server.log().count("cannot restart the LocustTest watcher") >= attempts,
            timeout=30,
        )
        # However fast a start fails, the attempts wait at least their shortest pauses.
        shortest = sum(BACKOFF_START / 2 * 2**i for i in range(attempts))
        assert time.monotonic() - killed >= shortest
