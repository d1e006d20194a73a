"""The LocustTests of the watcher process, fed to every worker over a Unix socket.

One process of the pod lists and watches the API (`webhook.watcher`); each worker keeps the
parsed LocustTests it is sent, so a worker never imports the Kubernetes client (~17 MB a
process) and the API server sees one list+watch per pod, not one per worker.

Messages are JSON arrays, one per line; a LocustTest travels as `models.to_wire`'s record.
- watcher to worker: `["reset"]`, `["put", [record, ...]]`, `["synced"]`: every LocustTest,
  once the watcher has listed and again after each re-list; then `["put", [record]]` and
  `["del", [[namespace, name]]]` for each change; `["got", id, record or null, error or null]`
  answers a lookup.
- worker to watcher: `["get", id, namespace, name]`, a cache miss to look up in the API.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

import orjson

from . import metrics
from .lookup import Backoff, SourceUnavailable
from .models import LocustTestInfo, from_wire, to_wire

if TYPE_CHECKING:
    from .cache import ClusterSource, Key

log = logging.getLogger(__name__)

CHUNK = 500  # records per "put" line of a full copy
SEND_TIMEOUT = 5.0  # a worker that reads nothing for this long is dropped
MAX_BEHIND = 32 * 1024 * 1024  # bytes waiting for a worker before it is dropped (it then
# reconnects and starts again from a full copy); a single message of any size is let through
ANSWER_MARGIN = 1.0  # on top of the lookup timeout, for the watcher's answer to arrive
# A LocustTest the watcher found absent is taken for absent, without asking again, this long
# (the copy is read first: one the watch delivers meanwhile is found): the rest of a burst of
# pods naming it is answered at once. At most ABSENT_MAX are remembered.
ABSENT_SECONDS = 5.0
ABSENT_MAX = 1024


def _line(message: list[Any]) -> bytes:
    return orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)


def _send_timeout(conn: socket.socket, seconds: float) -> None:
    """Bound every send on `conn` (SO_SNDTIMEO); receiving stays blocking, so a thread can wait
    on the connection as long as the other side says nothing."""
    whole = int(seconds)
    micro = int((seconds - whole) * 1e6)
    if not whole and not micro:
        micro = 1  # a zero timeval means no timeout at all
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole, micro))


class _Peer:
    """One worker's connection, in the watcher. What is sent to it waits in its outbox for its
    own writing thread: a worker that reads slowly, or not at all, delays no one else."""

    def __init__(self, conn: socket.socket) -> None:
        _send_timeout(conn, SEND_TIMEOUT)
        self.conn = conn
        self.closed = False
        self._outbox: list[bytes] = []
        self._queued = 0
        self._pending = threading.Condition()

    def post(self, data: bytes) -> bool:
        """Queue `data` for the writing thread; False when the worker is too far behind."""
        with self._pending:
            if self.closed:
                return True  # dropped meanwhile (an answer that came after its worker left)
            if self._outbox and self._queued + len(data) > MAX_BEHIND:
                return False
            self._outbox.append(data)
            self._queued += len(data)
            self._pending.notify()
        return True

    def write(self) -> None:
        """Send what is queued, in order, until `close()`. Raises OSError when the worker has
        read nothing for SEND_TIMEOUT or the connection failed."""
        while True:
            with self._pending:
                while not self._outbox and not self.closed:
                    self._pending.wait()
                if self.closed:
                    return
                data = b"".join(self._outbox)
                self._outbox, self._queued = [], 0
            self.conn.sendall(data)

    def close(self) -> None:
        with self._pending:
            self.closed = True
            self._pending.notify()
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it
        self.conn.close()


class FeedServer:
    """The watcher's side: sends the cache to every connected worker and answers its misses.

    It is the ClusterSource's listener: changes are queued from the thread that made them,
    under one lock, so a worker receives them in the order they were made.
    """

    def __init__(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by the watcher process before this one
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._socket.bind(path)
            self._socket.listen(64)
        except OSError:
            self._socket.close()
            raise
        self._lock = threading.Lock()
        self._peers: set[_Peer] = set()
        self._source: ClusterSource | None = None
        self._stopping = threading.Event()

    def run(self, source: ClusterSource) -> None:
        """Start `source` and serve workers until `stop()`."""
        self._source = source
        source.start()
        while True:
            try:
                conn, _ = self._socket.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            peer = _Peer(conn)
            with self._lock:
                self._peers.add(peer)
                if source.ready():
                    self._send(peer, self._copy())
            try:
                threading.Thread(target=self._read, args=(peer,), daemon=True).start()
                threading.Thread(target=self._write, args=(peer,), daemon=True).start()
            except RuntimeError as exc:  # no thread to be had (a PID limit): it reconnects
                self._drop(peer, f"cannot start its threads: {exc}")

    def stop(self) -> None:
        """Stop listening, the source, and every worker's connection (workers reconnect)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._socket.close()
        with self._lock:
            for peer in list(self._peers):
                self._drop(peer)
        if self._source is not None:
            self._source.stop()

    # -- cache.Listener ------------------------------------------------------------------------

    def listed(self) -> None:
        with self._lock:
            if self._source is not None and self._source.ready():
                copy = self._copy()
                for peer in list(self._peers):
                    self._send(peer, copy)

    def changed(self, key: Key) -> None:
        with self._lock:
            # Before the first full copy there is nobody to tell: that copy will hold it.
            if self._source is None or not self._source.ready():
                return
            # The value now, not the one that triggered the call: two threads may race.
            info = self._source.cached(key)
            line = _line(["put", [to_wire(info)]] if info is not None else ["del", [list(key)]])
            for peer in list(self._peers):
                self._send(peer, line)

    # -- one worker ------------------------------------------------------------------------------

    def _copy(self) -> bytes:
        """Every cached LocustTest, as the lines of a full copy."""
        assert self._source is not None
        records = [to_wire(info) for info in self._source.snapshot()]
        lines = [_line(["reset"])]
        lines += (_line(["put", records[i : i + CHUNK]]) for i in range(0, len(records), CHUNK))
        lines.append(_line(["synced"]))
        return b"".join(lines)

    def _send(self, peer: _Peer, data: bytes) -> None:
        if not peer.post(data):
            self._drop(peer, f"it is {MAX_BEHIND} bytes behind")

    def _drop(self, peer: _Peer, reason: str = "") -> None:
        """Close the worker's connection (it reconnects); `reason` is logged, once."""
        if reason and not peer.closed:
            log.warning("dropping a worker's feed connection: %s", reason)
        self._peers.discard(peer)
        peer.close()

    def _write(self, peer: _Peer) -> None:
        try:
            peer.write()  # returns once the peer is dropped
        except OSError as exc:
            self._drop(peer, str(exc))

    def _read(self, peer: _Peer) -> None:
        """The worker's lookups, each answered from a thread of its own. Whatever ends this
        loop (the worker left, a line that is not a lookup, no thread to be had) also ends the
        connection, so the worker notices and reconnects instead of waiting on a dead one."""
        try:
            with peer.conn.makefile("rb") as lines:
                for line in lines:
                    _, request_id, namespace, name = orjson.loads(line)
                    threading.Thread(
                        target=self._answer,
                        args=(peer, request_id, namespace, name),
                        daemon=True,
                    ).start()
        except Exception as exc:
            log.warning("a worker's feed connection failed: %s", exc)
        finally:
            self._drop(peer)

    def _answer(self, peer: _Peer, request_id: int, namespace: str, name: str) -> None:
        assert self._source is not None
        try:
            info = self._source.get(namespace, name)
            answer = ["got", request_id, None if info is None else to_wire(info), None]
        except SourceUnavailable as exc:
            answer = ["got", request_id, None, str(exc)]
        except Exception as exc:
            log.exception("LocustTest lookup for a worker failed")
            answer = ["got", request_id, None, f"internal error in the watcher: {exc!r}"]
        self._send(peer, _line(answer))


class _Answer:
    """A lookup the worker waits for: a request on the wire (set by the feed thread), or a miss
    in `FeedSource.get` (set by the thread that asked, for those that wait on it)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.record: list[Any] | None = None
        self.error: str | None = None
        self.lost = False  # the connection closed before the answer came


class FeedSource:
    """The worker's side: a LocustTestSource kept by the watcher process.

    Reads are lock-free dict lookups; a full copy is built aside and swapped in at once. When
    the watcher is gone the worker keeps answering from what it has, and reconnects.
    """

    def __init__(self, path: str, lookup_timeout: float = 1.5, misses_in_flight: int = 8) -> None:
        self._path = path
        self._lookup_timeout = lookup_timeout
        # Lookups of LocustTests missing from the copy in flight at once; one more fails at
        # once (SourceUnavailable: the failure policy), so that pods naming LocustTests that do
        # not exist cannot hold every thread for the lookup timeout. The pods of a LocustTest
        # being looked up wait on that lookup.
        self._misses_in_flight = misses_in_flight
        self._view: dict[tuple[str, str], LocustTestInfo] = {}
        self._synced = False
        self._conn: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._waiting: dict[int, _Answer] = {}
        self._misses: dict[tuple[str, str], _Answer] = {}  # set once the asker has its answer
        self._absent: dict[tuple[str, str], float] = {}  # until when (time.monotonic)
        self._misses_lock = threading.Lock()
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- LocustTestSource --------------------------------------------------------------------

    def start(self) -> None:
        metrics.CACHE_SYNCED.set(0)
        self._thread = threading.Thread(target=self._run, name="locusttest-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(2.0)

    def ready(self) -> bool:
        """True once a full copy has arrived; stays True while the watcher is away."""
        return self._synced

    def size(self) -> int:
        return len(self._view)

    def get(self, namespace: str, name: str) -> LocustTestInfo | None:
        """The LocustTest from the copy, else the watcher's answer (its cache or the API)."""
        info = self._view.get((namespace, name))
        if info is not None:
            metrics.looked_up("cache_hit")
            return info
        key = (namespace, name)
        with self._misses_lock:
            if self._absent.get(key, 0.0) > time.monotonic():
                metrics.looked_up("not_found")
                return None
            miss = self._misses.get(key)
            asking = miss is None
            if miss is None:
                if len(self._misses) >= self._misses_in_flight:
                    metrics.looked_up("unavailable")
                    raise SourceUnavailable(
                        f"this worker is already looking up {len(self._misses)} LocustTests "
                        "missing from its copy"
                    )
                miss = self._misses[key] = _Answer()
                # What those waiting on it are told if the asker fails on something else.
                miss.error = "internal error"
        if asking:
            # A failure is counted where it happened: in the watcher, or in _ask.
            try:
                miss.record, miss.error = self._ask(namespace, name)
            except SourceUnavailable as exc:
                miss.error = str(exc)
            finally:
                with self._misses_lock:
                    del self._misses[key]
                    if miss.record is None and miss.error is None:
                        if len(self._absent) >= ABSENT_MAX:
                            self._absent.clear()
                        self._absent[key] = time.monotonic() + ABSENT_SECONDS
                miss.done.set()
        elif not miss.done.wait(self._lookup_timeout + 2 * ANSWER_MARGIN):
            metrics.looked_up("unavailable")
            raise SourceUnavailable("no answer")
        if miss.error is not None:
            raise SourceUnavailable(miss.error)
        return None if miss.record is None else from_wire(miss.record)

    def _ask(self, namespace: str, name: str) -> tuple[list[Any] | None, str | None]:
        """The watcher's answer to a miss: (record or None, its error or None)."""
        request_id = next(self._ids)
        answer = self._waiting[request_id] = _Answer()
        try:
            conn = self._conn
            if conn is None:
                raise OSError("not connected")
            timeout = self._lookup_timeout + ANSWER_MARGIN
            with self._send_lock:
                try:
                    conn.sendall(_line(["get", request_id, namespace, name]))
                except OSError as exc:
                    # The watcher took nothing for `timeout` (SO_SNDTIMEO), or the connection
                    # broke. Part of the line may be out: only a new connection starts clean,
                    # and the feed thread makes one once this one is shut.
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
                    if isinstance(exc, BlockingIOError):
                        raise OSError(f"it read nothing for {timeout:g}s") from exc
                    raise
            if answer.done.wait(timeout) and not answer.lost:
                return answer.record, answer.error
            reason = "the connection closed" if answer.lost else f"no answer within {timeout:g}s"
        except OSError as exc:
            reason = str(exc)
        finally:
            self._waiting.pop(request_id, None)
        metrics.looked_up("unavailable")
        raise SourceUnavailable(f"the LocustTest watcher process: {reason}")

    # -- the feed --------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff()
        lost_logged = False
        while not self._stopping.is_set():
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(self._path)
            except OSError as exc:
                conn.close()
                if not lost_logged:
                    log.warning("cannot reach the LocustTest watcher process: %s", exc)
                    lost_logged = True
                self._stopping.wait(backoff.next())
                continue
            _send_timeout(conn, self._lookup_timeout + ANSWER_MARGIN)
            self._conn = conn
            try:
                self._receive(conn, backoff)
            except (OSError, ValueError) as exc:
                log.warning("the LocustTest watcher's feed failed: %s", exc)
            finally:
                self._conn = None
                conn.close()
                self._abandon_waiting()
            if not self._stopping.is_set():
                log.warning("lost the LocustTest watcher process, reconnecting")
                lost_logged = True
                self._stopping.wait(backoff.next())

    def _receive(self, conn: socket.socket, backoff: Backoff) -> None:
        incoming: dict[tuple[str, str], LocustTestInfo] | None = None  # a full copy, arriving
        with conn.makefile("rb") as lines:
            for line in lines:
                message = orjson.loads(line)
                kind = message[0]
                target = self._view if incoming is None else incoming
                if kind == "put":
                    for record in message[1]:
                        info = from_wire(record)
                        target[(info.namespace, info.name)] = info
                elif kind == "del":
                    for namespace, name in message[1]:
                        target.pop((namespace, name), None)
                elif kind == "got":
                    answer = self._waiting.get(message[1])
                    if answer is not None:
                        answer.record, answer.error = message[2], message[3]
                        answer.done.set()
                elif kind == "reset":
                    incoming = {}
                elif kind == "synced" and incoming is not None:
                    # One assignment: readers see the old copy or the new one, never a mix.
                    self._view, incoming = incoming, None
                    if not self._synced:
                        log.info("received %d LocustTests from the watcher", len(self._view))
                    self._synced = True
                    backoff.reset()
                    metrics.CACHE_SYNCED.set(1)
                if kind in ("put", "del", "synced"):
                    metrics.CACHE_SIZE.set(len(self._view))

    def _abandon_waiting(self) -> None:
        for answer in list(self._waiting.values()):
            answer.lost = True
            answer.done.set()
