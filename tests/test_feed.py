"""The watcher's feed: a ClusterSource on the local Kubernetes API, sent over a Unix socket to
FeedSources, as `serve` runs them in its watcher process and its workers."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from kubeapi import FakeKubeAPI
from kubernetes import config
from prometheus_client import REGISTRY
from test_cache import locusttest, wait_until

from webhook import feed
from webhook.cache import ClusterSource
from webhook.feed import FeedServer, FeedSource
from webhook.lookup import SourceUnavailable
from webhook.models import LocustTestInfo, from_wire, parse_locusttest, to_wire


class InThreadWatcher:
    """What `python -m webhook.watcher` runs, in a thread of the test."""

    def __init__(self, api: FakeKubeAPI, path: Path, tmp_path: Path) -> None:
        kubeconfig = api.write_kubeconfig(tmp_path / f"kubeconfig-{time.monotonic_ns()}")
        self.feed = FeedServer(str(path))
        self.source = ClusterSource(
            config.new_client_from_config(config_file=str(kubeconfig)), listener=self.feed
        )
        self.thread = threading.Thread(target=self.feed.run, args=(self.source,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.feed.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as server:
        yield server


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "feed.sock"


@pytest.fixture
def start_watcher(
    api: FakeKubeAPI, path: Path, tmp_path: Path
) -> Iterator[Callable[[], InThreadWatcher]]:
    started: list[InThreadWatcher] = []

    def start() -> InThreadWatcher:
        started.append(InThreadWatcher(api, path, tmp_path))
        return started[-1]

    yield start
    for watcher in started:
        if watcher.thread.is_alive():
            watcher.stop()


IN_FLIGHT = 4  # the workers' misses_in_flight


@pytest.fixture
def worker(path: Path) -> Iterator[FeedSource]:
    source = FeedSource(str(path), lookup_timeout=1.0, misses_in_flight=IN_FLIGHT)
    source.start()
    yield source
    source.stop()


def lookups(result: str) -> float:
    return REGISTRY.get_sample_value("locust_webhook_lookups_total", {"result": result}) or 0.0


def known(worker: FeedSource, namespace: str, name: str) -> bool:
    """Whether the worker's copy holds the LocustTest (a miss may raise while reconnecting)."""
    try:
        return worker.get(namespace, name) is not None
    except SourceUnavailable:
        return False


def test_wire_records_survive_json_and_share_specs_like_a_parse() -> None:
    test = locusttest("load", "team-a", endpoint="http://collector:4318")
    test["spec"]["observability"]["openTelemetry"]["extraEnvVars"] = {"B": "2", "A": "1"}
    test["metadata"]["annotations"] = {"observability.locust.io/required": "true"}
    v1 = {"apiVersion": "locust.io/v1", "kind": "LocustTest", "metadata": {"name": "old"}}
    invalid = {**test, "spec": {"observability": "on"}}
    for obj in (test, v1, invalid):
        info = parse_locusttest(obj)
        copy = from_wire(orjson.loads(orjson.dumps(to_wire(info))))
        assert copy == info
        assert copy.otel is info.otel  # one OtelSpec per distinct setting, as in the cache
    assert info.problem == "spec.observability is not an object" and info.required


def test_a_worker_receives_every_locusttest_then_each_change(
    api: FakeKubeAPI, start_watcher: Callable[[], InThreadWatcher], worker: FeedSource
) -> None:
    api.create(locusttest("a"))
    api.create(locusttest("b", "team-b", enabled=False))
    watcher = start_watcher()
    wait_until(worker.ready)
    assert worker.size() == 2
    for key in (("default", "a"), ("team-b", "b")):
        assert worker.get(*key) == watcher.source.cached(key)
    api.create(locusttest("c", endpoint="http://new:4317"))
    api.update(locusttest("a", enabled=False))
    api.delete("team-b", "b")
    wait_until(lambda: worker.size() == 2 and not known(worker, "team-b", "b"))
    c, a = worker.get("default", "c"), worker.get("default", "a")
    assert c is not None and c.otel is not None and c.otel.endpoint == "http://new:4317"
    assert a is not None and not a.otel_enabled


def test_a_worker_that_connects_late_gets_the_whole_cache(
    api: FakeKubeAPI, start_watcher: Callable[[], InThreadWatcher], path: Path
) -> None:
    for i in range(1200):  # more than one "put" line
        api.create(locusttest(f"t-{i}", f"ns-{i % 7}"))
    watcher = start_watcher()
    wait_until(watcher.source.ready)
    late = FeedSource(str(path))
    late.start()
    try:
        wait_until(late.ready)
        assert late.size() == 1200
        assert late.get("ns-3", "t-1193") == watcher.source.cached(("ns-3", "t-1193"))
    finally:
        late.stop()


def created_but_not_delivered(
    api: FakeKubeAPI, start_watcher: Callable[[], InThreadWatcher], worker: FeedSource
) -> None:
    """A watcher, the worker with its copy, and LocustTest default/fresh created where only a
    direct GET finds it: the watch will not deliver it in time."""
    start_watcher()
    wait_until(worker.ready)
    api.lag = 30.0
    api.create(locusttest("fresh", endpoint="http://direct:4317"))


def test_a_miss_is_looked_up_by_the_watcher(
    api: FakeKubeAPI, start_watcher: Callable[[], InThreadWatcher], worker: FeedSource
) -> None:
    created_but_not_delivered(api, start_watcher, worker)
    hits = lookups("cache_hit")
    info = worker.get("default", "fresh")
    assert info is not None and info.otel is not None and info.otel.endpoint == "http://direct:4317"
    # The watcher sends what it found to every worker: the next lookup is a hit.
    wait_until(lambda: worker.size() == 1)
    assert worker.get("default", "fresh") == info
    assert lookups("cache_hit") == hits + 1
    assert worker.get("default", "never-created") is None


def count_asks(worker: FeedSource) -> list[str]:
    """The names the worker asks its watcher about, from now on."""
    asked: list[str] = []
    ask = worker._ask

    def counted(namespace: str, name: str) -> Any:
        asked.append(name)
        return ask(namespace, name)

    worker._ask = counted  # type: ignore[method-assign]
    return asked


def concurrently(worker: FeedSource, names: list[str]) -> list[object]:
    """What `get` gives for each name (or raises), all asked at once."""
    results: list[object] = [None] * len(names)

    def look_up(index: int) -> None:
        try:
            results[index] = worker.get("default", names[index])
        except SourceUnavailable as exc:
            results[index] = exc

    threads = [threading.Thread(target=look_up, args=(i,)) for i in range(len(names))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def test_the_pods_of_a_locusttest_missing_from_the_copy_share_one_lookup_and_its_answer(
    api: FakeKubeAPI, start_watcher: Callable[[], InThreadWatcher], worker: FeedSource
) -> None:
    """More of them than lookups may be in flight: none is refused, all get the answer."""
    created_but_not_delivered(api, start_watcher, worker)
    api.latency = 0.5
    asked = count_asks(worker)
    found = concurrently(worker, ["fresh"] * (2 * IN_FLIGHT))
    assert all(isinstance(info, LocustTestInfo) and info.name == "fresh" for info in found), found
    assert asked == ["fresh"]
    api.stop()  # the watcher's error, once, for all of them
    failed = concurrently(worker, ["unreachable"] * (2 * IN_FLIGHT))
    assert all(isinstance(exc, SourceUnavailable) for exc in failed), failed
    assert len({str(exc) for exc in failed}) == 1
    assert asked == ["fresh", "unreachable"]


def test_lookups_in_flight_are_bounded_and_an_absence_is_remembered(
    start_watcher: Callable[[], InThreadWatcher],
    worker: FeedSource,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pods naming LocustTests that do not exist cannot hold every thread of a worker for the
    lookup timeout (the watcher retries a 404 for it): beyond `misses_in_flight` lookups a miss
    fails at once, and one found absent is not asked about again for a while."""
    start_watcher()
    wait_until(worker.ready)
    asked = count_asks(worker)
    names = [f"absent-{i}" for i in range(IN_FLIGHT)]
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.extend(concurrently(worker, names)))
    thread.start()
    wait_until(lambda: len(worker._misses) == IN_FLIGHT)
    unavailable = lookups("unavailable")
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match=f"already looking up {IN_FLIGHT} LocustTests"):
        worker.get("default", "one-too-many")
    assert time.monotonic() - started < 0.5
    assert lookups("unavailable") == unavailable + 1
    thread.join(10)
    assert results == [None] * IN_FLIGHT  # every one of them answered: not found
    assert worker._misses == {}
    started = time.monotonic()
    assert worker.get("default", "absent-0") is None
    assert time.monotonic() - started < 0.5
    assert sorted(asked) == names  # absent-0 not asked about again
    monkeypatch.setattr(feed, "ABSENT_SECONDS", 0.0)
    assert worker.get("default", "brief") is None
    assert worker.get("default", "brief") is None
    assert asked.count("brief") == 2  # its absence was forgotten at once: asked again


def test_the_watchers_error_reaches_the_worker(
    api: FakeKubeAPI, start_watcher: Callable[[], InThreadWatcher], worker: FeedSource
) -> None:
    start_watcher()
    wait_until(worker.ready)
    api.stop()
    with pytest.raises(SourceUnavailable, match=r"^NewConnectionError: .*Connection refused"):
        worker.get("default", "gone")


def test_without_its_watcher_a_worker_keeps_its_copy_then_takes_the_next_one(
    api: FakeKubeAPI, start_watcher: Callable[[], InThreadWatcher], worker: FeedSource
) -> None:
    api.create(locusttest("kept"))
    api.create(locusttest("removed"))
    first = start_watcher()
    wait_until(lambda: worker.size() == 2)
    first.stop()
    wait_until(lambda: worker._conn is None)
    assert worker.ready() and worker.get("default", "kept") is not None
    unavailable = lookups("unavailable")
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="watcher process: not connected"):
        worker.get("default", "unknown")
    assert time.monotonic() - started < 0.5  # no waiting on a watcher that is not there
    assert lookups("unavailable") == unavailable + 1
    api.delete("default", "removed")
    api.create(locusttest("added"))
    start_watcher()
    wait_until(lambda: known(worker, "default", "added"), timeout=10)
    assert worker.size() == 2 and not known(worker, "default", "removed")


def test_a_lookup_in_flight_fails_when_the_watcher_goes(
    api: FakeKubeAPI, start_watcher: Callable[[], InThreadWatcher], worker: FeedSource
) -> None:
    watcher = start_watcher()
    wait_until(worker.ready)
    api.latency = 3.0  # the watcher's GET hangs
    threading.Timer(0.3, watcher.stop).start()
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="the connection closed"):
        worker.get("default", "slow")
    assert time.monotonic() - started < 1.5


def many_long_locusttests(api: FakeKubeAPI, count: int = 4000) -> None:
    """LocustTests whose full copy (~1.2 MB) is larger than a Unix socket buffers."""
    for i in range(count):
        api.create(locusttest(f"{'long-name-' * 20}{i}", f"ns-{i % 7}"))


def test_a_worker_that_reads_nothing_holds_up_no_other(
    api: FakeKubeAPI,
    start_watcher: Callable[[], InThreadWatcher],
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(feed, "SEND_TIMEOUT", 60.0)  # the silent worker is not dropped meanwhile
    many_long_locusttests(api)
    watcher = start_watcher()
    wait_until(watcher.source.ready)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(path))  # and never reads: its copy fills the socket and stops
        healthy = FeedSource(str(path))
        healthy.start()
        try:
            wait_until(lambda: healthy.ready() and healthy.size() == 4000)
            api.create(locusttest("after", "ns-0"))
            wait_until(lambda: healthy.size() == 4001)
        finally:
            healthy.stop()


@pytest.mark.parametrize(
    ("send_timeout", "max_behind", "why"),
    [
        (1.0, feed.MAX_BEHIND, "Resource temporarily unavailable"),
        (60.0, 2000, "it is 2000 bytes behind"),
    ],
    ids=["reads nothing for the send timeout", "falls too far behind"],
)
def test_a_worker_that_reads_nothing_is_dropped(
    api: FakeKubeAPI,
    start_watcher: Callable[[], InThreadWatcher],
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    send_timeout: float,
    max_behind: int,
    why: str,
) -> None:
    monkeypatch.setattr(feed, "SEND_TIMEOUT", send_timeout)
    monkeypatch.setattr(feed, "MAX_BEHIND", max_behind)
    many_long_locusttests(api)
    watcher = start_watcher()
    wait_until(watcher.source.ready)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(path))
        silent.recv(1, socket.MSG_PEEK)  # its copy is on its way: the socket fills and stops
        for i in range(20):  # ~6 KB of changes wait behind it
            api.create(locusttest(f"{'change-' * 30}{i}", "ns-0"))
        wait_until(lambda: "dropping a worker's feed connection" in caplog.text)
        assert why in caplog.text
        silent.settimeout(5.0)
        received = b""
        while chunk := silent.recv(1 << 16):  # what was buffered, then the end
            received += chunk
    assert received.startswith(b'["reset"]')
    assert not received.endswith(b'["synced"]\n')  # cut off: it never had the whole copy
    late = FeedSource(str(path))
    late.start()
    try:
        wait_until(lambda: late.ready() and late.size() == 4020)
    finally:
        late.stop()


def test_a_worker_that_stops_reading_for_a_moment_keeps_its_connection(
    api: FakeKubeAPI, start_watcher: Callable[[], InThreadWatcher], path: Path
) -> None:
    """The send timeout is for a worker that reads nothing at all: one that is busy for a
    second (a burst of admissions) with its socket full still gets its whole copy."""
    many_long_locusttests(api)
    watcher = start_watcher()
    wait_until(watcher.source.ready)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as busy:
        busy.connect(str(path))
        busy.recv(1, socket.MSG_PEEK)  # its copy is on its way: the socket fills and stops
        time.sleep(1.0)
        busy.settimeout(5.0)
        received = b""
        while not received.endswith(b'["synced"]\n'):
            chunk = busy.recv(1 << 16)
            assert chunk, "the watcher dropped the worker"
            received += chunk
    messages = [orjson.loads(line) for line in received.splitlines()]
    assert sum(len(message[1]) for message in messages if message[0] == "put") == 4000


def test_a_watcher_that_reads_nothing_fails_lookups_in_time_and_is_left(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watcher process that is alive but stuck: the worker's lookups fill the socket, then a
    send times out; the worker drops that connection and connects again."""
    monkeypatch.setattr(feed, "ANSWER_MARGIN", 0.0)
    accepted: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
        stuck.bind(str(path))
        stuck.listen(4)

        def accept() -> None:
            while True:
                try:
                    conn, _ = stuck.accept()
                except OSError:
                    return
                conn.sendall(b'["reset"]\n["synced"]\n')  # a whole (empty) copy; reads nothing
                accepted.append(conn)

        threading.Thread(target=accept, daemon=True).start()
        worker = FeedSource(str(path), lookup_timeout=0.01)
        worker.start()
        try:
            wait_until(worker.ready)
            for i in range(20_000):
                started = time.monotonic()
                with pytest.raises(SourceUnavailable) as failure:
                    worker.get("default", f"missing-{i}")
                assert time.monotonic() - started < 1.0
                if "read nothing for 0.01s" in str(failure.value):
                    break
            else:
                pytest.fail("20,000 lookups never filled the socket")
            wait_until(lambda: len(accepted) == 2)
        finally:
            worker.stop()
            for conn in accepted:
                conn.close()


def worker_connection(path: Path) -> socket.socket:
    """A raw connection to the watcher's feed, its first full copy read."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(path))
    conn.settimeout(5.0)
    received = b""
    while b'["synced"]\n' not in received:
        received += conn.recv(1 << 16)
    return conn


def test_workers_that_leave_are_forgotten(
    start_watcher: Callable[[], InThreadWatcher], path: Path
) -> None:
    """Every reconnect is a new connection: the watcher holds on to none of the gone ones."""
    watcher = start_watcher()
    wait_until(watcher.source.ready)
    for _ in range(5):
        worker_connection(path).close()
    with worker_connection(path):
        wait_until(lambda: len(watcher.feed._peers) == 1, timeout=5)
    wait_until(lambda: not watcher.feed._peers, timeout=5)


def sleeps(thread: threading.Thread) -> int:
    """How many times the thread has waited on something (Linux counts it per thread)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    (count,) = [
        line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt")
    ]
    return int(count)


def test_a_worker_without_its_watcher_waits_between_attempts(path: Path) -> None:
    """Nothing at the socket: the worker tries again after growing pauses (a handful of
    attempts in a second), not in a loop that keeps a core busy."""
    worker = FeedSource(str(path))
    worker.start()
    try:
        assert worker._thread is not None
        before = sleeps(worker._thread)
        time.sleep(1.0)
        assert sleeps(worker._thread) - before < 50
    finally:
        worker.stop()


def test_a_line_that_is_not_a_lookup_ends_the_connection(
    start_watcher: Callable[[], InThreadWatcher], path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = start_watcher()
    wait_until(watcher.source.ready)
    with worker_connection(path) as conn:
        conn.sendall(b"5\n")
        assert conn.recv(1 << 16) == b""  # closed: the worker would reconnect
    assert "a worker's feed connection failed" in caplog.text


def test_a_lookup_that_fails_inside_the_watcher_is_answered_with_the_error(
    start_watcher: Callable[[], InThreadWatcher], path: Path
) -> None:
    watcher = start_watcher()
    wait_until(watcher.source.ready)
    with worker_connection(path) as conn:
        conn.sendall(b'["get", 7, ["not", "a", "namespace"], "x"]\n')  # unhashable: a bug
        kind, request_id, record, error = orjson.loads(conn.recv(1 << 16))
    assert (kind, request_id, record) == ("got", 7, None)
    assert error.startswith("internal error in the watcher:")


def test_a_worker_never_imports_the_kubernetes_client() -> None:
    """What a worker of `serve` imports, in a fresh interpreter: the client (~17 MB a process)
    belongs to the watcher process alone."""
    script = (
        "import sys\n"
        "from webhook.config import ServeSettings\n"
        "from webhook.server import build_app, build_source\n"
        "settings = ServeSettings()\n"
        "build_app(settings, build_source(settings, '/nonexistent/feed.sock'))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'kubernetes', 'urllib3'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
