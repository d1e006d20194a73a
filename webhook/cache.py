"""LocustTests from the Kubernetes API: list+watch into an in-memory cache, direct GET on a miss."""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import urllib3
from kubernetes import client, watch

from . import kube, metrics
from .lookup import Backoff, SourceUnavailable
from .models import InvalidLocustTest, LocustTestInfo, parse_locusttest

log = logging.getLogger(__name__)

GROUP = "locust.io"
PLURAL = "locusttests"
RESOURCE = f"{PLURAL}.{GROUP}"
# Newest first: only v2 carries spec.observability.
VERSIONS = ("v2", "v1")
CLUSTER = ""  # the scope of a cluster-wide list/watch
PAGE_SIZE = 500
CONNECT_TIMEOUT = 5.0
# A watch asks the server to end it after WATCH_TIMEOUT to 1.5 times that (spread, so that the
# watches of several replicas do not all end together), and for bookmarks, which an API server
# sends about once a minute once its watch cache has seen a LocustTest change (none before, up
# to etcd's 10-minute progress notifications). WATCH_SILENCE without a byte, and the connection
# is taken for dead (a peer gone without a FIN, a dropped flow) and the watch resumed. A quiet
# watch ends by its timeout first, rather than being taken for dead and backed off as a failure.
WATCH_SILENCE = 150.0
WATCH_TIMEOUT = 90.0
# A watch the server ends sooner than this (a draining server, a proxy) is resumed after a
# backoff, not at once: an API that closes every watch at once would be asked in a loop.
SHORT_WATCH = 1.0
LIST_TIMEOUT = 60.0
# Deleted LocustTests remembered for the direct GETs under way (each lasts at most
# --lookup-timeout).
DELETIONS_KEPT = 1024
LOOKUP_DELAYS = (0.05, 0.1, 0.2, 0.4)
STOP_TIMEOUT = 2.0

# What a list, a watch or a GET raises when the API is unreachable, slow, or answers garbage.
_TRANSIENT = (urllib3.exceptions.HTTPError, OSError, ValueError)

Key = tuple[str, str]
View = dict[Key, LocustTestInfo]


class Listener(Protocol):
    """Told of every change to the cache, from the thread that made it (webhook.feed)."""

    def listed(self) -> None:
        """A scope was listed (again): its LocustTests were replaced at once."""

    def changed(self, key: Key) -> None:
        """The LocustTest `key` was added, changed or deleted: `cached(key)` tells which."""


@dataclass
class _Scope:
    """One list/watch: a namespace, or CLUSTER; owned by its thread."""

    namespace: str
    version: str = VERSIONS[0]
    resource_version: str | None = None
    refused_logged: int = 0  # the HTTP status (403, 404) logged since the last good list
    watch: watch.Watch | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return (
            "at the cluster scope"
            if self.namespace == CLUSTER
            else f"in namespace {self.namespace}"
        )


class ClusterSource:
    """LocustTests of the cluster, kept by list+watch of `locusttests.locust.io` (v2, else v1).

    Reads are lock-free dict lookups; a re-list swaps a scope's whole dict at once.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        namespaces: tuple[str, ...] = (),
        lookup_timeout: float = 1.5,
        *,
        watch_timeout: float = WATCH_TIMEOUT,
        listener: Listener | None = None,
    ) -> None:
        self._namespaces = frozenset(namespaces)
        self._lookup_timeout = lookup_timeout
        self._watch_timeout = watch_timeout
        self._listener = listener
        # Our own pool: no urllib3-level retries (they would restart timeouts and break the
        # lookup budget; we retry ourselves) and room for every watch plus lookups.
        configuration = copy.deepcopy(api_client.configuration)
        configuration.retries = False
        configuration.connection_pool_maxsize = len(namespaces) + 8
        self._client = client.ApiClient(configuration)
        self._api = client.CustomObjectsApi(self._client)
        self._scopes = [_Scope(ns) for ns in sorted(namespaces)] or [_Scope(CLUSTER)]
        # Keys are fixed here so that size() can iterate while watch threads swap the values.
        self._views: dict[str, View] = {scope.namespace: {} for scope in self._scopes}
        self._synced: set[str] = set()
        self._version: str | None = None
        self._stopping = threading.Event()
        # A direct GET's answer against the watch's events (see _found).
        self._lock = threading.Lock()
        self._deleted: dict[str, None] = {}  # uids of recently deleted LocustTests, in order

    @classmethod
    def from_environment(
        cls,
        namespaces: tuple[str, ...] = (),
        lookup_timeout: float = 1.5,
        listener: Listener | None = None,
    ) -> ClusterSource:
        """A source using the in-cluster service account, else KUBECONFIG or ~/.kube/config."""
        try:
            api_client = kube.api_client()
        except kube.NoClusterConfig as exc:
            raise SourceUnavailable(f"{exc} (set KUBECONFIG, or use --locusttests DIR)") from exc
        return cls(api_client, namespaces, lookup_timeout, listener=listener)

    # -- LocustTestSource --------------------------------------------------------------------

    def start(self) -> None:
        """Start one list/watch thread per scope (after gunicorn forks, never at import)."""
        metrics.CACHE_SYNCED.set(0)
        for scope in self._scopes:
            name = f"locusttest-watch-{scope.namespace or 'cluster'}"
            scope.thread = threading.Thread(target=self._run, args=(scope,), name=name, daemon=True)
            scope.thread.start()

    def stop(self) -> None:
        """Stop the watch threads, waiting at most STOP_TIMEOUT for them."""
        self._stopping.set()
        for scope in self._scopes:
            if scope.watch is not None:
                scope.watch.stop()  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + STOP_TIMEOUT
        for scope in self._scopes:
            if scope.thread is not None:
                scope.thread.join(max(0.0, deadline - time.monotonic()))
        self._client.close()  # type: ignore[no-untyped-call]

    def ready(self) -> bool:
        """True once every scope has been listed; stays True through later API outages."""
        return len(self._synced) == len(self._scopes)

    def size(self) -> int:
        """How many LocustTests the cache holds."""
        return sum(len(view) for view in self._views.values())

    def cached(self, key: Key) -> LocustTestInfo | None:
        """The cached LocustTest `key` = (namespace, name), without a lookup."""
        view = self._views.get(key[0] if self._namespaces else CLUSTER)
        return None if view is None else view.get(key)

    def snapshot(self) -> list[LocustTestInfo]:
        """Every cached LocustTest (each scope's dict is copied in one step)."""
        return [info for view in list(self._views.values()) for info in list(view.values())]

    def get(self, namespace: str, name: str) -> LocustTestInfo | None:
        """The cached LocustTest, else one bounded direct GET (the watch may lag behind)."""
        if self._namespaces and namespace not in self._namespaces:
            metrics.looked_up("not_found")
            return None
        view = self._views[namespace if self._namespaces else CLUSTER]
        info = view.get((namespace, name))
        if info is not None:
            metrics.looked_up("cache_hit")
            return info
        return self._get_direct(namespace, name, view)

    # -- direct lookups ------------------------------------------------------------------------

    def _get_direct(self, namespace: str, name: str, view: View) -> LocustTestInfo | None:
        deadline = time.monotonic() + self._lookup_timeout
        answered = False  # the API said 404 at least once: the LocustTest does not exist
        failure: Exception | None = None
        attempt = 0
        while True:
            try:
                obj = self._fetch(namespace, name, deadline)
            except client.ApiException as exc:
                failure = exc
                if exc.status in (401, 403):
                    break  # credentials and RBAC do not fix themselves within a lookup
            except _TRANSIENT as exc:
                failure = exc
            else:
                if obj is not None:
                    return self._found(obj, view)
                answered = True
            delay = LOOKUP_DELAYS[min(attempt, len(LOOKUP_DELAYS) - 1)]
            attempt += 1
            if time.monotonic() + delay >= deadline:
                break
            time.sleep(delay)
        if answered:
            metrics.looked_up("not_found")
            return None
        metrics.looked_up("unavailable")
        raise SourceUnavailable(_describe(failure)) from failure

    def _fetch(self, namespace: str, name: str, deadline: float) -> Any:
        """The object from the API, None on 404 (in every version that may serve it)."""
        for version in (self._version,) if self._version else VERSIONS:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer within {self._lookup_timeout:g}s")
            try:
                resp: Any = self._api.get_namespaced_custom_object(
                    GROUP, version, namespace, PLURAL, name,
                    _preload_content=False, _request_timeout=remaining,
                )  # fmt: skip
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
                continue
            try:
                return orjson.loads(resp.data)
            finally:
                resp.release_conn()
        return None

    def _found(self, obj: Any, view: View) -> LocustTestInfo | None:
        """What a direct GET read, unless the watch delivered the LocustTest meanwhile (its
        copy is kept) or the deletion of the very object read (not found: kept, the GET's copy
        would stay until the next re-list; a LocustTest created again has another uid)."""
        info = _parse(obj)
        if info is None:
            metrics.looked_up("not_found")
            return None
        key = (info.namespace, info.name)
        with self._lock:
            watched = view.get(key)
            if watched is None and _uid(obj) in self._deleted:
                metrics.looked_up("not_found")
                return None
            if watched is None:
                view[key] = info
        metrics.looked_up("direct_get")
        if watched is not None:
            return watched
        metrics.CACHE_SIZE.set(self.size())
        if self._listener is not None:
            self._listener.changed(key)
        return info

    # -- list and watch ------------------------------------------------------------------------

    def _run(self, scope: _Scope) -> None:
        backoff = Backoff()
        while not self._stopping.is_set():
            try:
                if scope.resource_version is None:
                    self._list(scope)
                    backoff.reset()
                started = time.monotonic()
                delivered = self._watch(scope, backoff)
                if self._stopping.is_set():
                    return
                # The server ended the watch (timeoutSeconds): resume where it stopped, unless
                # a newer version is served now (the operator was upgraded): then re-list.
                short = time.monotonic() - started < SHORT_WATCH
                if short and not delivered:  # not even a bookmark: a proxy's page, a draining
                    log.warning("LocustTest watch %s ended at once, empty", scope.where)
                    metrics.WATCH_RESTARTS.labels(reason="error").inc()
                else:
                    metrics.WATCH_RESTARTS.labels(reason="closed").inc()
                if short:
                    self._stopping.wait(backoff.next())
                if scope.version != VERSIONS[0] and self._served(VERSIONS[0], scope):
                    log.info("%s/%s is served now: re-listing %s", GROUP, VERSIONS[0], scope.where)
                    scope.resource_version = None
                continue
            except client.ApiException as exc:
                if exc.status == 410:
                    log.info("LocustTest watch %s expired, re-listing", scope.where)
                    metrics.WATCH_RESTARTS.labels(reason="expired").inc()
                    scope.resource_version = None
                    continue
                if exc.status == 404:
                    # The version being watched is no longer served: list again, in the
                    # newest version that is.
                    scope.resource_version = None
                failure: Exception = exc
            # Whatever the API sent, the thread must survive: the cache keeps serving.
            except Exception as exc:
                failure = exc
            if self._stopping.is_set():
                return
            self._log_failure(scope, failure)
            metrics.WATCH_RESTARTS.labels(reason="error").inc()
            self._stopping.wait(backoff.next())

    def _log_failure(self, scope: _Scope, exc: Exception) -> None:
        # RBAC and a missing CRD do not fix themselves within seconds: said once, not at
        # every retry, until a list succeeds.
        status = exc.status if isinstance(exc, client.ApiException) else 0
        if status in (403, 404):
            if scope.refused_logged == status:
                return
            scope.refused_logged = status
        if status == 403:
            log.error(
                "RBAC: the service account cannot list %s %s (needs get, list, watch)",
                RESOURCE,
                scope.where,
            )
        elif status == 404:
            log.error("%s is not served (is the LocustTest CRD installed?)", RESOURCE)
        elif isinstance(exc, (client.ApiException, *_TRANSIENT)):
            log.warning("LocustTest list/watch %s failed: %s", scope.where, _describe(exc))
        else:
            log.error("LocustTest list/watch %s failed", scope.where, exc_info=exc)

    def _list_call(self, version: str, scope: _Scope, **kwargs: Any) -> Any:
        if scope.namespace == CLUSTER:
            return self._api.list_cluster_custom_object(GROUP, version, PLURAL, **kwargs)
        return self._api.list_namespaced_custom_object(
            GROUP, version, scope.namespace, PLURAL, **kwargs
        )

    def _list_page(self, version: str, scope: _Scope, token: str | None) -> Any:
        resp = self._list_call(
            version, scope,
            limit=PAGE_SIZE, _continue=token,
            _preload_content=False, _request_timeout=(CONNECT_TIMEOUT, LIST_TIMEOUT),
        )  # fmt: skip
        try:
            return orjson.loads(resp.data)
        finally:
            resp.release_conn()

    def _served(self, version: str, scope: _Scope) -> bool:
        """Whether the API serves LocustTests in `version` (a list of at most one)."""
        try:
            resp = self._list_call(
                version, scope, limit=1,
                _preload_content=False, _request_timeout=(CONNECT_TIMEOUT, LIST_TIMEOUT),
            )  # fmt: skip
        except client.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        resp.release_conn()
        return True

    def _first_page(self, scope: _Scope) -> tuple[str, Any]:
        """The first page of the list, from the newest served version."""
        for version in VERSIONS[:-1]:
            try:
                return version, self._list_page(version, scope, None)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
        return VERSIONS[-1], self._list_page(VERSIONS[-1], scope, None)

    def _list(self, scope: _Scope) -> None:
        version, page = self._first_page(scope)
        if version != self._version:
            log.info("reading LocustTests as %s/%s", GROUP, version)
            self._version = version
        scope.version = version
        resource_version = str(page["metadata"]["resourceVersion"])
        view: View = {}
        while True:
            for item in page.get("items") or ():
                item.setdefault("apiVersion", f"{GROUP}/{version}")
                info = _parse(item)
                if info is not None:
                    view[(info.namespace, info.name)] = info
            token = page["metadata"].get("continue")
            if not token:
                break
            page = self._list_page(version, scope, token)
        # One assignment: readers see the old view or the new one, never a mix.
        self._views[scope.namespace] = view
        scope.resource_version = resource_version
        scope.refused_logged = 0
        self._synced.add(scope.namespace)
        metrics.CACHE_SIZE.set(self.size())
        if self.ready():
            metrics.CACHE_SYNCED.set(1)
        log.info("listed %d LocustTests %s", len(view), scope.where)
        if self._listener is not None:
            self._listener.listed()

    def _watch(self, scope: _Scope, backoff: Backoff) -> int:
        """Watch from scope.resource_version until the server ends it; the events delivered."""
        delivered = 0
        timeout = max(1, round(self._watch_timeout * random.uniform(1.0, 1.5)))
        scope.watch = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            if self._stopping.is_set():
                return delivered
            stream = scope.watch.stream(  # type: ignore[no-untyped-call]
                self._list_call, scope.version, scope,
                resource_version=scope.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                _request_timeout=(CONNECT_TIMEOUT, WATCH_SILENCE),
            )  # fmt: skip
            for event in stream:
                if self._stopping.is_set():
                    return delivered
                if isinstance(event, dict):
                    self._apply(scope, event["type"], event["raw_object"])
                    backoff.reset()
                    delivered += 1
        finally:
            scope.watch = None
        return delivered

    def _apply(self, scope: _Scope, kind: str, obj: Any) -> None:
        key: Key | None = None
        info = _parse(obj) if kind in ("ADDED", "MODIFIED") else None
        if info is not None:
            key = (info.namespace, info.name)
            with self._lock:
                self._views[scope.namespace][key] = info
        elif kind == "DELETED":  # (an ADDED or MODIFIED object without a name is skipped)
            metadata = obj.get("metadata") or {}
            key = (metadata.get("namespace") or "", metadata.get("name") or "")
            with self._lock:
                self._views[scope.namespace].pop(key, None)
                if len(self._deleted) >= DELETIONS_KEPT:
                    self._deleted = dict.fromkeys(list(self._deleted)[DELETIONS_KEPT // 2 :])
                if uid := _uid(obj):
                    self._deleted[uid] = None
        scope.resource_version = str(obj["metadata"]["resourceVersion"])
        if key is not None:
            metrics.CACHE_SIZE.set(self.size())
            if self._listener is not None:
                self._listener.changed(key)


def _uid(obj: Any) -> str:
    """The object's metadata.uid ('' when it has none)."""
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    uid = metadata.get("uid") if isinstance(metadata, dict) else None
    return uid if isinstance(uid, str) else ""


def _parse(obj: Any) -> LocustTestInfo | None:
    """The LocustTest as kept (an invalid one with its `problem`, logged), None without a
    name."""
    try:
        info = parse_locusttest(obj)
    except InvalidLocustTest as exc:
        log.warning("skipping a LocustTest without a name: %s", exc)
        return None
    if info.problem:
        log.warning("invalid LocustTest %s/%s: %s", info.namespace, info.name, info.problem)
    return info


def _describe(exc: Exception | None) -> str:
    if isinstance(exc, client.ApiException):
        if exc.status == 403:
            return f"RBAC: the service account cannot get {RESOURCE} (needs get, list, watch)"
        if exc.status == 401:
            return "HTTP 401 Unauthorized: the API server refused the credentials (expired?)"
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
