"""`serve`: gunicorn over TLS with gthread workers, and the watcher process that feeds them.

The app (and with it the source and its feed thread) is built in `load()`, which gunicorn
calls in every worker after the fork: nothing starts at import.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import selectors
import signal
import socket
import ssl
import tempfile
import time
from collections import deque
from functools import partial
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.config import Config
from gunicorn.workers.gthread import TConn, ThreadWorker

from . import logs
from .config import ServeSettings, SettingError, named
from .lookup import DirectorySource, LocustTestSource
from .tls import REQUEST_READ_BUDGET, ReloadingContext
from .watcher import Watcher, forget_process

log = logging.getLogger(__name__)


GC_THRESHOLDS = (5_000, 20, 100)


def tune_gc() -> None:
    """Objects alive after start-up (modules, app, cache) never become garbage: keep them out
    of the collector (a full collection over them paused requests for 14-20 ms, the p99 at
    load). What remains for it is each request's cyclic garbage (8 objects a request, from
    werkzeug's URL matcher), collected in young collections whose pause grows with the
    threshold: at 50,000 a worker stalled for 9-19 ms every ~6,000 requests, at 5,000 it
    pauses 1-2 ms every ~600, for the same total time (measured under 1,000 req/s)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def share_with_workers() -> None:
    """Before each fork, in the master: import what every worker imports, then move everything
    the master holds out of the collector's reach. The workers then share those pages: without
    it each worker's first full collection wrote to every object's header, copying every page
    (measured when the workers still imported the Kubernetes client: a worker's Pss at start
    went from 39.7 to 28.5 MB, its private pages from 32.5 to 16.6 MB). Modules that create
    Prometheus metrics (webhook.metrics, webhook.feed) stay out: the master must not have
    metric files of its own."""
    import flask  # noqa: F401
    import prometheus_client  # noqa: F401  (after `serve` set PROMETHEUS_MULTIPROC_DIR)

    from . import mutation, patch, review  # noqa: F401

    gc.collect()
    gc.freeze()


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}


class WorkerForkSignals:
    """The stop signals across the fork of a worker. A worker runs the master's handlers,
    copied by the fork, until gunicorn installs its own; those only queue a signal in a process
    where nothing reads it, so a SIGTERM there would be lost and the master would wait out the
    graceful timeout. So the master blocks the stop signals just before it forks a worker, and
    right after the fork (os.register_at_fork: before the worker runs any of gunicorn's code)
    the master restores its mask, and the worker sets them to their default action, then
    restores it. A stop signal that reaches a worker before it has handlers of its own (one
    sent while they are blocked waits for the unblock) stops it: it has served nothing yet."""

    def __init__(self) -> None:
        self._mask: set[int | signal.Signals] | None = None  # the master's, while it forks a worker
        os.register_at_fork(after_in_parent=self._in_master, after_in_child=self._in_worker)

    def hold(self) -> None:
        """In the master, just before it forks a worker."""
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def _in_master(self) -> None:
        if self._mask is not None:
            mask, self._mask = self._mask, None
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _in_worker(self) -> None:
        if self._mask is not None:
            mask, self._mask = self._mask, None
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def build_source(settings: ServeSettings, feed: str | None) -> LocustTestSource:
    """The directory source when --locusttests is set, else the watcher's feed at `feed`."""
    if settings.locusttests:
        return DirectorySource(settings.locusttests)
    assert feed is not None
    from .feed import FeedSource

    # Lookups of as many LocustTests missing from the copy as half the threads, at most.
    return FeedSource(feed, settings.lookup_timeout, max(1, settings.threads // 2))


def build_app(settings: ServeSettings, source: LocustTestSource) -> Any:
    """The WSGI app answering from `source`."""
    from .app import create_app
    from .handler import Handler

    handler = Handler(source, settings.mutation, settings.failure_policy, settings.namespaces)
    return create_app(handler, source, settings.max_body_bytes)


class WebhookWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, except for connections that have sent nothing yet.

    gunicorn hands a new connection to a thread, which waits up to 5 s for its first bytes, and
    then keeps a silent one open for `keepalive` (120 s) among the worker's 1,000 connections:
    a few dozen silent connections held up every admission, and ~2,000 to a pod stopped it
    accepting until they timed out. Here a new connection waits in the worker's poller, taking
    no thread, until it sends something, and is closed if that takes longer than the read
    budget. At the connection limit the connection that has waited longest for its first bytes,
    else the one idle longest between requests, is closed to make room for the new one."""

    def accept(self, listener: Any) -> None:
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        self.nr_conns += 1
        conn = TConn(self.cfg, sock, client, listener.getsockname())  # non-blocking
        conn.timeout = time.monotonic() + REQUEST_READ_BUDGET
        self.pending_conns.append(conn)  # gunicorn's own: read when readable, closed on timeout
        readable = partial(self.on_pending_socket_readable, conn)
        self.poller.register(sock, selectors.EVENT_READ, readable)
        if self.nr_conns >= self.worker_connections:
            self._make_room(conn)

    # One poll returns the events of many connections; one evicted by _make_room while an
    # earlier event was handled (closed: fileno -1) is passed over, not handed to gunicorn,
    # whose unregister of a closed socket raised and ended the worker.
    def on_pending_socket_readable(self, conn: TConn, client: Any) -> None:
        if conn.sock.fileno() != -1:
            super().on_pending_socket_readable(conn, client)

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        if conn.sock.fileno() != -1:
            super().on_client_socket_readable(conn, client)

    def _make_room(self, new: TConn) -> None:
        waiting: deque[TConn]
        for waiting in (self.pending_conns, self.keepalived_conns):
            if waiting and waiting[0] is not new:
                oldest = waiting.popleft()
                with contextlib.suppress(OSError, KeyError, ValueError):
                    self.poller.unregister(oldest.sock)
                self.nr_conns -= 1
                oldest.close()
                return


class TLSConfig(Config):  # type: ignore[misc]
    """gunicorn's settings, serving TLS without its `certfile` and `keyfile`: the `ssl_context`
    hook hands out the context that ReloadingContext holds. With them set, every worker that
    gunicorn starts checks that both files exist (each binds its own socket, reuse_port): one
    started while a file was missing for a moment (a Secret update, a renewal) failed to boot,
    and gunicorn then stopped the whole server. A worker serves the pair it was forked with
    until it can read the files again."""

    @property
    def is_ssl(self) -> bool:
        return True


class WebhookServer(BaseApplication):  # type: ignore[misc]
    """gunicorn configured for the API server's traffic (SPEC section 8)."""

    def __init__(self, settings: ServeSettings, feed: str | None = None) -> None:
        self.settings = settings
        self.feed = feed
        # Checked here, in the master, so a bad pair stops the start with a clear message.
        self.tls = ReloadingContext(settings.cert_file, settings.key_file)
        self.fork_signals = WorkerForkSignals()
        self.source: LocustTestSource | None = None
        super().__init__()

    def load_default_config(self) -> None:
        self.cfg = TLSConfig(self.usage, prog=self.prog)

    def load_config(self) -> None:
        s = self.settings
        tls = self.tls

        def ssl_context(_conf: Any, _default: Any) -> ssl.SSLContext:
            return tls.context()

        def post_worker_init(_worker: Any) -> None:
            tls.publish()
            logs.LINES.start()
            tune_gc()

        def pre_fork(_server: Any, _worker: Any) -> None:
            tls.refresh()
            share_with_workers()
            self.fork_signals.hold()

        def worker_exit(_server: Any, _worker: Any) -> None:
            if self.source is not None:
                self.source.stop()
            logs.LINES.stop()

        def child_exit(_server: Any, worker: Any) -> None:
            forget_process(worker.pid)

        def when_ready(server: Any) -> None:
            # In place of gunicorn's "Listening at" line (logs.GunicornLogger drops it), which
            # has no address: each worker binds its own socket.
            server.log.info(
                "serving HTTPS on %s port %d: %d workers of %d threads",
                s.host, s.port, s.workers, s.threads,
            )  # fmt: skip
            tls.warn_if_not_valid()  # here, once logging is set up

        options = {
            "bind": f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}",
            "worker_class": f"{__name__}.WebhookWorker",
            "workers": s.workers,
            "threads": s.threads,
            "keepalive": s.keepalive,
            # Each worker binds its own socket: connections spread over workers by the kernel.
            "reuse_port": True,
            "graceful_timeout": s.graceful_timeout,
            "timeout": 30,
            "ssl_context": ssl_context,
            "pre_fork": pre_fork,
            "post_worker_init": post_worker_init,
            "worker_exit": worker_exit,
            "child_exit": child_exit,
            "when_ready": when_ready,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": s.log_level,
            "proc_name": "locust-webhook",
            "worker_tmp_dir": tempfile.gettempdir(),
            "logconfig_dict": logs.dict_config(s.log_level),
            "logger_class": logs.GunicornLogger,
            # The control socket would be written under $HOME: read-only in the container.
            "control_socket_disable": True,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Runs in each worker after the fork: the source's threads belong to this worker.
        self.source = build_source(self.settings, self.feed)
        self.source.start()
        return build_app(self.settings, self.source)


def check_address(host: str, port: int) -> None:
    """Raise SettingError unless `host` port `port` can be listened on. The workers each bind
    it with SO_REUSEPORT: on a port another program holds they would fail and be restarted
    forever, and on one another `serve` holds they would share its connections without a word.
    A probe without SO_REUSEPORT is refused in both cases (with SO_REUSEADDR, so that the
    TIME_WAIT connections of a server just stopped do not count)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = f"{named('--host')}/{named('--port')}"
        raise SettingError(f"{where}: cannot listen on {host} port {port}: {reason}") from None


def serve(settings: ServeSettings) -> None:
    """Run until SIGTERM/SIGINT; in-flight admissions get `graceful_timeout` to finish.

    Raises SettingError when the address cannot be listened on, SourceUnavailable when
    LocustTests come from a cluster that cannot be reached."""
    check_address(settings.host, settings.port)
    if settings.locusttests:
        WebhookServer(settings).run()
        return
    watcher = Watcher(settings)
    try:
        watcher.start()
        WebhookServer(settings, watcher.path).run()
    finally:
        watcher.stop()
