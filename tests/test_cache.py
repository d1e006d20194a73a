"""ClusterSource against a real HTTPS server speaking the Kubernetes list/watch protocol."""

from __future__ import annotations

import gc
import http.client
import json
import logging
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kubeapi import FakeKubeAPI
from kubernetes import client, config
from prometheus_client import REGISTRY

from webhook import cache
from webhook.cache import ClusterSource, Key
from webhook.lookup import BACKOFF_CAP, BACKOFF_START, Backoff, SourceUnavailable
from webhook.models import REQUIRED_ANNOTATION, LocustTestInfo

MakeSource = Callable[..., ClusterSource]


def locusttest(
    name: str,
    namespace: str = "default",
    endpoint: str = "otel-collector.monitoring:4317",
    enabled: bool = True,
) -> dict[str, Any]:
    """A v2 LocustTest with an OpenTelemetry block, shaped like the operator's samples."""
    return {
        "apiVersion": "locust.io/v2",
        "kind": "LocustTest",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "image": "locustio/locust:2.32.0",
            "master": {"command": "--locustfile /lotest/src/locustfile.py"},
            "worker": {"command": "--locustfile /lotest/src/locustfile.py", "replicas": 2},
            "observability": {
                "openTelemetry": {"enabled": enabled, "endpoint": endpoint, "insecure": True}
            },
        },
    }


def wait_until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def endpoint(info: LocustTestInfo | None) -> str | None:
    return None if info is None or info.otel is None else info.otel.endpoint


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as server:
        yield server


@pytest.fixture
def make_source(api: FakeKubeAPI, tmp_path: Path) -> Iterator[MakeSource]:
    """Build (and start) ClusterSources on a kubeconfig for `api` or another server."""
    made: list[tuple[ClusterSource, client.ApiClient]] = []

    def make(
        namespaces: tuple[str, ...] = (),
        lookup_timeout: float = 1.5,
        server: FakeKubeAPI | None = None,
        start: bool = True,
        **kwargs: Any,
    ) -> ClusterSource:
        kubeconfig = (server or api).write_kubeconfig(tmp_path / f"kubeconfig-{len(made)}")
        api_client = config.new_client_from_config(config_file=str(kubeconfig))
        source = ClusterSource(api_client, namespaces, lookup_timeout, **kwargs)
        made.append((source, api_client))
        if start:
            source.start()
        return source

    yield make
    for source, api_client in made:
        source.stop()
        api_client.close()


def test_initial_list_fills_the_cache_and_makes_it_ready(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    api.create(locusttest("load-a", "team-a"))
    api.create(locusttest("team-a.load-b", "team-a", enabled=False))
    api.create(locusttest("load-a", "team-b", endpoint="http://other:4317"))
    source = make_source()
    wait_until(source.ready)
    assert source.size() == 3
    wait_until(lambda: metric("locust_webhook_cache_synced") == 1)  # set just after ready()
    hits = metric("locust_webhook_lookups_total", result="cache_hit")
    info = source.get("team-a", "load-a")
    assert info is not None and info.otel is not None
    assert info.otel_enabled and info.otel.endpoint == "otel-collector.monitoring:4317"
    assert info.api_version == "locust.io/v2"
    other = source.get("team-a", "team-a.load-b")
    assert other is not None and not other.otel_enabled
    assert metric("locust_webhook_lookups_total", result="cache_hit") == hits + 2
    assert [r.path for r in api.lists()] == ["/apis/locust.io/v2/locusttests"]
    assert api.requests and all(
        r.headers.get("authorization") == "Bearer test-token" for r in api.requests
    )


def test_list_is_paged(api: FakeKubeAPI, make_source: MakeSource) -> None:
    for i in range(1203):
        api.create(locusttest(f"load-{i:04d}", f"ns-{i % 3}"))
    source = make_source()
    wait_until(source.ready)
    assert source.size() == 1203
    assert len(api.lists()) == 3
    assert all(r.query["limit"] == "500" for r in api.lists())


def test_not_ready_while_the_api_is_down_then_ready(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    api.create(locusttest("load-a"))
    api.stop()
    source = make_source(lookup_timeout=0.3)
    with pytest.raises(SourceUnavailable, match=r"^(NewConnectionError|JSONDecodeError): "):
        source.get("default", "load-a")
    assert not source.ready()
    api.start()
    wait_until(source.ready, timeout=10)
    assert source.get("default", "load-a") is not None


def test_ready_survives_an_outage_and_the_cache_keeps_serving(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    api.create(locusttest("load-a"))
    source = make_source()
    wait_until(source.ready)
    api.stop()
    assert source.ready()
    assert source.get("default", "load-a") is not None
    api.start()
    api.create(locusttest("load-b"))
    wait_until(lambda: source.size() == 2, timeout=10)
    api.restart()
    api.create(locusttest("load-c"))
    wait_until(lambda: source.size() == 3, timeout=10)


def test_watch_sees_created_updated_and_deleted_locusttests(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    source = make_source(lookup_timeout=0.2)
    wait_until(source.ready)
    api.create(locusttest("load-a", endpoint="http://first:4317"))
    wait_until(lambda: source.size() == 1)
    lookups = metric("locust_webhook_lookups_total", result="direct_get")
    info = source.get("default", "load-a")
    assert info is not None and info.otel is not None and info.otel.endpoint == "http://first:4317"

    api.update(locusttest("load-a", endpoint="http://second:4317"))

    def updated() -> bool:
        info = source.get("default", "load-a")
        return (
            info is not None
            and info.otel is not None
            and info.otel.endpoint.startswith("http://second")
        )

    wait_until(updated)
    api.delete("default", "load-a")
    wait_until(lambda: source.size() == 0)
    assert source.get("default", "load-a") is None
    assert metric("locust_webhook_lookups_total", result="direct_get") == lookups
    assert len(api.lists()) == 1


def test_locusttests_with_the_same_otel_settings_share_one_spec_until_none_uses_it(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    for name in ("load-a", "load-b"):
        api.create(locusttest(name, endpoint="http://shared:4317"))
    api.create(locusttest("load-c", endpoint="http://own:4317"))
    source = make_source(lookup_timeout=0.2)
    wait_until(lambda: source.size() == 3)
    a, b, c = (source.get("default", n) for n in ("load-a", "load-b", "load-c"))
    assert a is not None and b is not None and c is not None
    assert a.otel is b.otel and a.otel is not None
    assert c.otel is not None and c.otel is not a.otel and c.otel.endpoint == "http://own:4317"
    shared = weakref.ref(a.otel)
    del a, b, c
    # Once no cached LocustTest uses the settings, nothing keeps them.
    api.update(locusttest("load-a", endpoint="http://own:4317"))
    api.delete("default", "load-b")
    wait_until(lambda: source.size() == 2)
    moved, own = source.get("default", "load-a"), source.get("default", "load-c")
    assert moved is not None and own is not None and moved.otel is own.otel
    del moved, own
    gc.collect()
    assert shared() is None


def test_bookmarks_move_the_resource_version_so_a_reconnect_needs_no_relist(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    source = make_source(namespaces=("watched",))
    wait_until(source.ready)
    # Changes elsewhere advance the resourceVersion; only bookmarks tell the watcher about it.
    for i in range(3):
        api.create(locusttest(f"load-{i}", "elsewhere"))
    latest = api.resource_version
    time.sleep(3 * api.bookmark_interval)  # let a few bookmarks through
    api.compact()
    api.cut_watches()
    wait_until(lambda: any(r.query.get("resourceVersion") == latest for r in api.watches()))
    assert len(api.lists()) == 1
    assert all(r.query["allowWatchBookmarks"].lower() == "true" for r in api.watches())
    assert all(r.path.endswith("/namespaces/watched/locusttests") for r in api.watches())


def test_expired_watch_relists_and_drops_objects_deleted_meanwhile(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    api.create(locusttest("load-a"))
    api.create(locusttest("load-b"))
    source = make_source(lookup_timeout=0.2)
    wait_until(lambda: source.size() == 2)
    expired = metric("locust_webhook_watch_restarts_total", reason="expired")
    api.fail_next(10_000)  # keep the source disconnected while things change
    api.cut_watches()
    api.delete("default", "load-a")
    api.create(locusttest("load-c"))
    api.compact()
    api.fail_next(0)
    wait_until(lambda: len(api.lists()) == 2, timeout=10)
    # The list was asked for; its answer replaces the view in one step, dropping load-a. (The
    # size alone cannot tell: it is 2 before the re-list too.)
    wait_until(lambda: source.get("default", "load-a") is None, timeout=10)
    assert source.size() == 2
    assert source.get("default", "load-c") is not None
    assert metric("locust_webhook_watch_restarts_total", reason="expired") == expired + 1


def test_http_410_on_the_watch_request_relists(api: FakeKubeAPI, make_source: MakeSource) -> None:
    source = make_source()
    wait_until(source.ready)
    api.fail_next(1, code=410)
    api.cut_watches()
    wait_until(lambda: len(api.lists()) == 2, timeout=5)
    api.create(locusttest("load-a"))
    wait_until(lambda: source.size() == 1)


def test_cut_watch_resumes_from_the_last_resource_version(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    api.create(locusttest("load-a"))
    source = make_source()
    wait_until(source.ready)
    api.create(locusttest("load-b"))
    wait_until(lambda: source.size() == 2)
    position = api.resource_version
    api.cut_watches()
    wait_until(lambda: len(api.watches()) == 2)
    api.create(locusttest("load-c"))
    wait_until(lambda: source.size() == 3)
    assert api.watches()[1].query["resourceVersion"] == position
    assert len(api.lists()) == 1


def test_watch_timeout_reconnects_without_relist(api: FakeKubeAPI, make_source: MakeSource) -> None:
    closed = metric("locust_webhook_watch_restarts_total", reason="closed")
    source = make_source(watch_timeout=1)
    wait_until(source.ready)
    api.create(locusttest("load-a"))
    wait_until(lambda: len(api.watches()) >= 2, timeout=5)
    assert metric("locust_webhook_watch_restarts_total", reason="closed") >= closed + 1
    assert 1 <= int(api.watches()[0].query["timeoutSeconds"]) <= 2
    api.create(locusttest("load-b"))
    wait_until(lambda: source.size() == 2)
    assert len(api.lists()) == 1


def test_silent_watch_is_taken_for_dead_and_restarted(
    api: FakeKubeAPI, make_source: MakeSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch that neither sends nor ends (a peer gone without a FIN) must not freeze the
    cache: after WATCH_SILENCE without even a bookmark (the fake sends one every 0.2 s), the
    read gives up and the watch resumes, long before the timeoutSeconds it asked for."""
    monkeypatch.setattr(cache, "WATCH_SILENCE", 2.0)
    source = make_source(watch_timeout=600)
    wait_until(source.ready)
    time.sleep(3)  # a live watch, sending bookmarks only, is kept
    assert len(api.watches()) == 1
    api.silent = True
    wait_until(lambda: len(api.watches()) >= 2, timeout=10)
    api.silent = False
    api.create(locusttest("load-a"))
    wait_until(lambda: source.size() == 1, timeout=10)
    assert len(api.lists()) == 1  # resumed, not re-listed


def test_a_quiet_watch_without_bookmarks_ends_by_its_timeout_not_as_dead(
    api: FakeKubeAPI, make_source: MakeSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API server sends no bookmark until its watch cache has seen a change (and none is
    promised): a watch of an unchanging cluster is silent. The server must end it (the
    timeoutSeconds asked) before WATCH_SILENCE takes it for dead, logs a failure and backs off.
    The real timings, 30 times faster."""
    scale = 30
    monkeypatch.setattr(cache, "WATCH_SILENCE", cache.WATCH_SILENCE / scale)
    api.bookmark_interval = 3600.0
    errors = metric("locust_webhook_watch_restarts_total", reason="error")
    closed = metric("locust_webhook_watch_restarts_total", reason="closed")
    source = make_source(watch_timeout=cache.WATCH_TIMEOUT / scale)
    wait_until(source.ready)
    wait_until(
        lambda: metric("locust_webhook_watch_restarts_total", reason="closed") >= closed + 2,
        timeout=15,
    )
    assert metric("locust_webhook_watch_restarts_total", reason="error") == errors
    api.create(locusttest("load-a"))
    wait_until(lambda: source.size() == 1, timeout=2)
    assert len(api.lists()) == 1


def test_watches_that_end_at_once_are_resumed_with_backoff(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    source = make_source()
    wait_until(source.ready)
    api.end_watches = True
    api.cut_watches()
    time.sleep(3)
    api.end_watches = False
    # Backoff from 0.2 s, doubling: a handful in 3 s, where a loop made ~70 against this fake.
    assert len(api.watches()) <= 8
    api.create(locusttest("load-a"))
    wait_until(lambda: source.size() == 1, timeout=15)


def test_watches_that_end_at_once_and_empty_are_errors(
    api: FakeKubeAPI, make_source: MakeSource, caplog: pytest.LogCaptureFixture
) -> None:
    """A watch that ends at once without even a bookmark (what the client makes of a chunked
    page that is not JSON, or a server that ends every watch) follows nothing: counted and
    logged as an error (it was a quiet `closed`: the cache fell behind and an alert on errors
    never fired)."""
    source = make_source()
    wait_until(source.ready)
    errors = metric("locust_webhook_watch_restarts_total", reason="error")
    api.end_watches = True
    api.cut_watches()  # itself an error: the stream is cut short
    wait_until(lambda: caplog.text.count("ended at once, empty") >= 2)
    assert metric("locust_webhook_watch_restarts_total", reason="error") >= errors + 3
    api.end_watches = False
    api.create(locusttest("load-a"))
    wait_until(lambda: source.size() == 1, timeout=15)


def test_server_error_burst_at_start_and_mid_watch_recovers(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    api.fail_next(3, code=500)
    source = make_source()
    wait_until(source.ready, timeout=10)
    lists = len(api.lists())
    errors = metric("locust_webhook_watch_restarts_total", reason="error")
    api.fail_next(3, code=503)
    api.cut_watches()
    api.create(locusttest("load-a"))
    wait_until(lambda: source.size() == 1, timeout=15)
    assert metric("locust_webhook_watch_restarts_total", reason="error") >= errors + 3
    assert len(api.lists()) == lists


def test_failing_list_is_retried_with_growing_delays(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    api.fail_next(10_000, code=503)
    started = time.monotonic()
    make_source()
    wait_until(lambda: len(api.lists()) >= 4)
    # Three waits, each at least half its ceiling, which doubles from BACKOFF_START.
    assert time.monotonic() - started >= BACKOFF_START / 2 * (1 + 2 + 4)


def test_backoff_doubles_with_jitter_up_to_its_cap_and_starts_over_on_reset() -> None:
    backoff = Backoff()
    delays = [backoff.next() for _ in range(12)]
    ceilings = [min(BACKOFF_START * 2**i, BACKOFF_CAP) for i in range(12)]
    assert ceilings[-1] == BACKOFF_CAP
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    backoff.reset()
    assert BACKOFF_START / 2 <= backoff.next() <= BACKOFF_START


def test_lookup_on_a_slow_api_returns_within_its_budget(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    source = make_source(lookup_timeout=0.5)
    wait_until(source.ready)
    api.latency = 3.0
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"^ReadTimeoutError: "):
        source.get("default", "missing")
    assert time.monotonic() - started < 0.5 + 0.2


def test_default_lookup_budget_holds_on_a_slow_api(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    source = make_source()
    wait_until(source.ready)
    api.latency = 0.7  # answers do come, but slower than the retries would like
    started = time.monotonic()
    assert source.get("default", "missing") is None
    assert time.monotonic() - started < 1.5 + 0.2


def test_missing_locusttest_is_none_after_retrying_for_the_budget(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    source = make_source()
    wait_until(source.ready)
    before = len(api.requests)
    started = time.monotonic()
    assert source.get("default", "missing") is None
    elapsed = time.monotonic() - started
    gets = [r for r in api.requests[before:] if r.path.endswith("/locusttests/missing")]
    # Growing delays (0.05, 0.1, 0.2, 0.4, 0.4 s) fit six GETs into the 1.5 s budget.
    assert 4 <= len(gets) <= 8
    assert 0.7 < elapsed < 1.5 + 0.2


def test_direct_get_finds_a_locusttest_the_watch_has_not_delivered(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    source = make_source()
    wait_until(source.ready)
    api.lag = 30.0
    api.create(locusttest("load-a", endpoint="http://direct:4317"))
    direct = metric("locust_webhook_lookups_total", result="direct_get")
    info = source.get("default", "load-a")
    assert info is not None and info.otel is not None and info.otel.endpoint == "http://direct:4317"
    assert metric("locust_webhook_lookups_total", result="direct_get") == direct + 1
    assert source.size() == 1
    gets = len([r for r in api.requests if r.path.endswith("/load-a")])
    assert source.get("default", "load-a") == info
    assert len([r for r in api.requests if r.path.endswith("/load-a")]) == gets


def test_direct_get_retries_a_404_until_the_locusttest_exists(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    source = make_source()
    wait_until(source.ready)
    api.lag = 30.0
    # The operator creates the LocustTest and its Jobs milliseconds apart.
    timer = threading.Timer(0.3, api.create, args=(locusttest("load-a"),))
    timer.start()
    try:
        started = time.monotonic()
        info = source.get("default", "load-a")
        assert info is not None and info.name == "load-a"
        assert time.monotonic() - started < 1.5
    finally:
        timer.join()


def test_a_slow_direct_get_does_not_undo_a_newer_watch_event(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    source = make_source(lookup_timeout=5.0)
    wait_until(source.ready)
    api.lag = 30.0
    api.create(locusttest("load-a", endpoint="http://old:4317"))
    api.hold_gets()
    with ThreadPoolExecutor(1) as pool:
        lookup = pool.submit(source.get, "default", "load-a")
        wait_until(lambda: api.held_gets() == 1)  # the GET has read load-a as it was
        api.update(locusttest("load-a", endpoint="http://new:4317"))
        api.lag = 0.0
        wait_until(lambda: endpoint(source.cached(("default", "load-a"))) == "http://new:4317")
        api.release_gets()
        assert lookup.result(timeout=5) is not None
    assert endpoint(source.cached(("default", "load-a"))) == "http://new:4317"


def test_a_direct_get_answered_after_the_watch_deleted_its_object_does_not_bring_it_back(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    """A GET reads a LocustTest, the LocustTest is deleted, the watch delivers the deletion,
    then the GET's answer arrives: kept, it would stay in the cache (and every worker's copy)
    until the next re-list, and its pods be mutated for a LocustTest that is gone."""
    source = make_source(lookup_timeout=5.0)
    wait_until(source.ready)
    api.lag = 30.0
    api.create(locusttest("load-a"))
    api.hold_gets()
    with ThreadPoolExecutor(1) as pool:
        lookup = pool.submit(source.get, "default", "load-a")
        wait_until(lambda: api.held_gets() == 1)  # the GET has read load-a
        api.delete("default", "load-a")
        api.create(locusttest("marker"))  # delivered after the deletion
        api.lag = 0.0
        wait_until(lambda: source.cached(("default", "marker")) is not None)
        api.release_gets()
        assert lookup.result(timeout=5) is None
    assert source.cached(("default", "load-a")) is None
    assert source.size() == 1
    assert source.get("default", "load-a") is None  # and a GET now finds nothing either


def test_a_direct_get_of_a_locusttest_created_again_survives_the_old_ones_deletion(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    """A test run again: its LocustTest deleted and created anew. The GET reads the new one
    while the lagging watch delivers the old one's deletion: that deletion is not the new
    one's, which is found (not failed open as not found)."""
    source = make_source(lookup_timeout=5.0)
    wait_until(source.ready)
    api.lag = 30.0
    api.create(locusttest("load-a", endpoint="http://old:4317"))
    api.delete("default", "load-a")
    api.create(locusttest("marker"))  # delivered after the deletion
    time.sleep(3.0)
    api.create(locusttest("load-a", endpoint="http://new:4317"))
    api.hold_gets()
    with ThreadPoolExecutor(1) as pool:
        lookup = pool.submit(source.get, "default", "load-a")
        wait_until(lambda: api.held_gets() == 1)  # the GET has read the new load-a
        api.lag = 1.5  # the old events are delivered now, the new one later
        wait_until(lambda: source.cached(("default", "marker")) is not None)
        api.release_gets()
        assert endpoint(lookup.result(timeout=5)) == "http://new:4317"
    wait_until(lambda: endpoint(source.cached(("default", "load-a"))) == "http://new:4317")


def test_watches_ask_the_server_to_end_them_before_the_silence_limit(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    """The default watch timeout (what `serve` uses) stays under WATCH_SILENCE: see the test of
    a quiet watch above."""
    source = make_source()
    wait_until(source.ready)
    asked = int(api.watches()[0].query["timeoutSeconds"])
    assert cache.WATCH_TIMEOUT <= asked <= 1.5 * cache.WATCH_TIMEOUT < cache.WATCH_SILENCE


def test_direct_get_answered_with_garbage_is_unavailable_after_retrying(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    source = make_source(lookup_timeout=0.3)
    wait_until(source.ready)
    api.garbage = True
    before = len(api.requests)
    with pytest.raises(SourceUnavailable, match=r"^(NewConnectionError|JSONDecodeError): "):
        source.get("default", "load-a")
    assert len([r for r in api.requests[before:] if r.path.endswith("/load-a")]) >= 2


def test_same_name_in_another_namespace_is_never_returned(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    api.create(locusttest("load-a", "team-a", endpoint="http://a:4317"))
    api.create(locusttest("load-a", "team-b", endpoint="http://b:4317"))
    source = make_source(lookup_timeout=0.2)
    wait_until(source.ready)
    a, b = source.get("team-a", "load-a"), source.get("team-b", "load-a")
    assert a is not None and a.otel is not None and a.otel.endpoint == "http://a:4317"
    assert b is not None and b.otel is not None and b.otel.endpoint == "http://b:4317"
    assert source.get("team-c", "load-a") is None


def test_configured_namespaces_are_watched_one_by_one_and_others_never_asked(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    api.create(locusttest("load-a", "team-a"))
    api.create(locusttest("load-a", "team-b"))
    api.create(locusttest("load-a", "team-c"))
    source = make_source(namespaces=("team-a", "team-b"))
    wait_until(source.ready)
    wait_until(lambda: len(api.watches()) == 2)
    assert source.size() == 2
    assert sorted(r.path for r in api.lists()) == [
        "/apis/locust.io/v2/namespaces/team-a/locusttests",
        "/apis/locust.io/v2/namespaces/team-b/locusttests",
    ]
    before = len(api.requests)
    assert source.get("team-c", "load-a") is None
    assert len(api.requests) == before
    assert source.get("team-b", "load-a") is not None


def test_ready_waits_for_every_namespace(api: FakeKubeAPI, make_source: MakeSource) -> None:
    api.create(locusttest("load-a", "team-a"))
    api.forbid_namespaces = frozenset({"team-b"})
    source = make_source(namespaces=("team-a", "team-b"))
    # team-a is listed (its watch follows the list); team-b is refused.
    wait_until(lambda: any("/team-a/" in r.path for r in api.watches()))
    wait_until(lambda: any("/team-b/" in r.path for r in api.lists()))
    assert source.size() == 1
    assert not source.ready()
    assert metric("locust_webhook_cache_synced") == 0
    api.forbid_namespaces = frozenset()
    wait_until(lambda: any("/team-b/" in r.path for r in api.watches()), timeout=10)
    assert source.ready()
    assert metric("locust_webhook_cache_synced") == 1


class Recorder:
    """A Listener that reads each change back as webhook.feed does, to tell workers."""

    def __init__(self) -> None:
        self.source: ClusterSource | None = None
        self.told: list[tuple[Key, str | None]] = []

    def listed(self) -> None:
        pass

    def changed(self, key: Key) -> None:
        assert self.source is not None
        self.told.append((key, endpoint(self.source.cached(key))))


def test_changes_in_configured_namespaces_reach_the_listener_as_they_are(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    recorder = Recorder()
    source = make_source(namespaces=("team-a",), listener=recorder, start=False)
    recorder.source = source
    source.start()
    wait_until(source.ready)
    api.create(locusttest("load-a", "team-a", endpoint="http://first:4317"))
    api.update(locusttest("load-a", "team-a", endpoint="http://second:4317"))
    api.delete("team-a", "load-a")
    wait_until(lambda: len(recorder.told) == 3)
    key = ("team-a", "load-a")
    assert recorder.told == [(key, "http://first:4317"), (key, "http://second:4317"), (key, None)]


def v1_locusttest(name: str) -> dict[str, Any]:
    """A locust.io/v1 LocustTest (no observability block in that version)."""
    return {
        "apiVersion": "locust.io/v1",
        "kind": "LocustTest",
        "metadata": {"name": name},
        "spec": {"masterCommandSeed": "-f /lotest/src/locustfile.py", "workerReplicas": 1},
    }


def test_v1_only_server_is_read_as_v1(make_source: MakeSource) -> None:
    with FakeKubeAPI(versions=("v1",)) as server:
        v1 = v1_locusttest("e2e-test-v1")
        server.create(v1)
        source = make_source(server=server)
        wait_until(source.ready)
        info = source.get("default", "e2e-test-v1")
        assert info is not None and info.api_version == "locust.io/v1" and info.otel is None
        assert [r.path for r in server.lists()] == [
            "/apis/locust.io/v2/locusttests",
            "/apis/locust.io/v1/locusttests",
        ]
        server.create({**v1, "metadata": {"name": "later"}})
        wait_until(lambda: source.size() == 2)
        assert all("/v1/" in r.path for r in server.watches())
        source.stop()


def test_v1_only_server_direct_get_finds_a_v1_locusttest(make_source: MakeSource) -> None:
    with FakeKubeAPI(versions=("v1",)) as server:
        source = make_source(server=server, lookup_timeout=0.5)
        wait_until(source.ready)
        server.lag = 30.0
        server.create(v1_locusttest("not-watched-yet"))
        info = source.get("default", "not-watched-yet")
        assert info is not None and info.api_version == "locust.io/v1" and info.otel is None
        gets = [r.path for r in server.requests if r.path.endswith("/not-watched-yet")]
        assert gets == ["/apis/locust.io/v1/namespaces/default/locusttests/not-watched-yet"]
        source.stop()


def test_v2_served_after_start_is_read_as_v2_from_the_next_watch(make_source: MakeSource) -> None:
    """The operator is upgraded while the webhook runs: its CRD starts serving v2."""
    with FakeKubeAPI(versions=("v1",)) as server:
        source = make_source(server=server, watch_timeout=1)
        wait_until(source.ready)
        server.versions = ("v1", "v2")
        server.create(locusttest("upgraded"))

        def read_as_v2() -> bool:
            info = source.cached(("default", "upgraded"))
            return info is not None and info.api_version == "locust.io/v2"

        wait_until(read_as_v2)
        assert "/v2/" in server.lists()[-1].path
        wait_until(lambda: "/v2/" in server.watches()[-1].path)  # and it watches on in v2
        source.stop()


def test_v2_no_longer_served_is_read_as_v1(make_source: MakeSource) -> None:
    """The operator is rolled back: its CRD serves v1 only."""
    with FakeKubeAPI() as server:
        source = make_source(server=server, watch_timeout=1)
        wait_until(source.ready)
        server.versions = ("v1",)
        wait_until(lambda: "/v1/" in server.lists()[-1].path, timeout=15)
        server.create(v1_locusttest("rolled-back"))
        wait_until(lambda: source.cached(("default", "rolled-back")) is not None)
        wait_until(lambda: "/v1/" in server.watches()[-1].path)  # and it watches on in v1
        source.stop()


def test_missing_rbac_logs_one_clear_line_and_recovers(
    api: FakeKubeAPI, make_source: MakeSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="webhook.cache")
    api.create(locusttest("load-a", "team-a"))
    api.forbid = True
    source = make_source(namespaces=("team-a",), lookup_timeout=0.3)
    wait_until(lambda: len(api.requests) >= 3, timeout=10)
    rbac = [r for r in caplog.records if r.getMessage().startswith("RBAC")]
    assert [r.getMessage() for r in rbac] == [
        "RBAC: the service account cannot list locusttests.locust.io in namespace team-a "
        "(needs get, list, watch)"
    ]
    assert rbac[0].levelno == logging.ERROR
    with pytest.raises(SourceUnavailable, match="RBAC"):
        source.get("team-a", "load-a")
    api.forbid = False
    wait_until(source.ready, timeout=10)


def test_rbac_lost_again_after_a_recovery_is_logged_again(
    api: FakeKubeAPI, make_source: MakeSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="webhook.cache")

    def rbac_lines() -> int:
        return len([r for r in caplog.records if r.getMessage().startswith("RBAC")])

    api.forbid = True
    source = make_source()
    wait_until(lambda: rbac_lines() == 1)
    api.forbid = False
    wait_until(source.ready, timeout=10)
    api.forbid = True
    api.cut_watches()
    wait_until(lambda: rbac_lines() == 2, timeout=10)


def problem(source: ClusterSource, name: str) -> str | None:
    """The cached LocustTest's problem ('' when it is valid), None when it is not cached."""
    info = source.cached(("default", name))
    return None if info is None else info.problem


def test_an_invalid_locusttest_is_kept_with_its_problem_and_the_watch_goes_on(
    api: FakeKubeAPI, make_source: MakeSource, caplog: pytest.LogCaptureFixture
) -> None:
    broken = locusttest("broken")
    broken["metadata"]["annotations"] = "not a map"
    api.create(broken)
    api.create(locusttest("load-a"))
    source = make_source()
    wait_until(source.ready)
    assert problem(source, "broken") == "metadata.annotations is not an object"
    assert "invalid LocustTest default/broken: metadata.annotations is not an object" in (
        caplog.text
    )
    api.update({**broken, "metadata": {**broken["metadata"], "annotations": ["still", "bad"]}})
    api.create(locusttest("load-b"))
    wait_until(lambda: source.size() == 3)
    assert problem(source, "broken") == "metadata.annotations is not an object"
    assert problem(source, "load-a") == problem(source, "load-b") == ""


def test_an_invalid_locusttest_found_by_a_direct_get_is_kept_with_its_problem(
    api: FakeKubeAPI, make_source: MakeSource, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_source()
    wait_until(source.ready)
    api.lag = 30.0  # the watch has not delivered it: the lookup asks the API
    broken = locusttest("broken")
    broken["metadata"]["annotations"] = {REQUIRED_ANNOTATION: "true"}
    broken["spec"]["observability"] = {"openTelemetry": {"extraEnvVars": ["A=1"]}}
    api.create(broken)
    found = source.get("default", "broken")
    assert found is not None
    assert found.problem == "spec.observability.openTelemetry.extraEnvVars is not an object"
    assert found.required and found.otel is None
    assert any(r.path.endswith("/broken") for r in api.requests)
    assert "invalid LocustTest default/broken: spec.observability" in caplog.text


def test_a_locusttest_changed_into_an_invalid_one_is_served_with_its_problem(
    api: FakeKubeAPI, make_source: MakeSource
) -> None:
    valid = api.create(locusttest("turned"))
    source = make_source()
    wait_until(lambda: source.cached(("default", "turned")) is not None)
    api.update({**valid, "metadata": {**valid["metadata"], "annotations": "not a map"}})
    wait_until(lambda: problem(source, "turned") == "metadata.annotations is not an object")
    api.update(valid)
    wait_until(lambda: problem(source, "turned") == "")


def test_stop_returns_promptly_with_open_watches(api: FakeKubeAPI, make_source: MakeSource) -> None:
    source = make_source(namespaces=("a", "b", "c"))
    wait_until(lambda: len(api.watches()) == 3)
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 1.0
    alive = [t.name for t in threading.enumerate() if t.name.startswith("locusttest-watch")]
    assert alive == []


def test_from_environment_uses_kubeconfig(
    api: FakeKubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "config")))
    api.create(locusttest("load-a"))
    source = ClusterSource.from_environment(("default",), 0.5)
    source.start()
    try:
        wait_until(source.ready)
        assert source.get("default", "load-a") is not None
    finally:
        source.stop()


def test_from_environment_without_any_configuration_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nothing-here"))
    with pytest.raises(SourceUnavailable, match="no Kubernetes API configuration"):
        ClusterSource.from_environment()


def test_from_environment_with_a_broken_in_cluster_configuration_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    with pytest.raises(SourceUnavailable, match=r"in-cluster configuration.*host/port is not set"):
        ClusterSource.from_environment()


# -- the fake API server itself ---------------------------------------------------------------


def raw_get(api: FakeKubeAPI, path: str, token: str = "test-token") -> tuple[int, bytes]:
    context = ssl.create_default_context(cadata=api.ca_pem.decode())
    conn = http.client.HTTPSConnection("localhost", int(api.url.rsplit(":", 1)[1]), context=context)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_fake_api_answers_errors_as_status_objects(api: FakeKubeAPI) -> None:
    code, body = raw_get(api, "/apis/locust.io/v2/namespaces/default/locusttests/x", "wrong")
    assert code == 401 and json.loads(body)["reason"] == "Unauthorized"
    code, body = raw_get(api, "/apis/locust.io/v2/namespaces/default/locusttests/x")
    status = json.loads(body)
    assert code == 404 and status["kind"] == "Status" and status["details"]["name"] == "x"
    code, _ = raw_get(api, "/apis/locust.io/v3/locusttests")
    assert code == 404


def test_fake_api_expired_watch_is_a_200_stream_with_one_error_event(api: FakeKubeAPI) -> None:
    old = api.resource_version
    api.create(locusttest("load-a"))
    api.compact()
    code, body = raw_get(api, f"/apis/locust.io/v2/locusttests?watch=1&resourceVersion={old}")
    events = [json.loads(line) for line in body.splitlines()]
    assert code == 200
    assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in events] == [
        ("ERROR", 410, "Expired")
    ]


def test_fake_api_watch_streams_events_after_the_resource_version(api: FakeKubeAPI) -> None:
    api.create(locusttest("load-a"))
    start = api.resource_version
    api.create(locusttest("load-b", "other"))
    api.delete("default", "load-a")
    code, body = raw_get(
        api,
        f"/apis/locust.io/v2/namespaces/default/locusttests?watch=true&resourceVersion={start}"
        "&timeoutSeconds=1",
    )
    events = [json.loads(line) for line in body.splitlines()]
    assert code == 200
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("DELETED", "load-a")]


def test_a_crd_not_installed_is_said_once_until_it_is(
    make_source: MakeSource, caplog: pytest.LogCaptureFixture
) -> None:
    """No LocustTest CRD: every retry gets 404. The error says what to do once, not at every
    retry (an error line every 30 s, forever); it is said again after the next good list."""
    with FakeKubeAPI(versions=()) as bare:
        source = make_source(server=bare)
        wait_until(lambda: len(bare.lists()) >= 8, timeout=15)
        assert caplog.text.count("is not served (is the LocustTest CRD installed?)") == 1
        assert not source.ready()
        bare.versions = ("v2",)
        wait_until(source.ready, timeout=15)
