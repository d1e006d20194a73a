"""The watcher process: the pod's one list+watch of LocustTests, fed to the workers.

`serve` starts it before gunicorn (a fresh interpreter, not a fork: neither the master nor
the workers ever import the Kubernetes client) and restarts it if it exits. It reports its
configuration on stdout ("ok", or "error: ..." and exit 2) and leaves when stdin closes,
which happens when `serve` is gone.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from .config import ServeSettings
from .lookup import Backoff, SourceUnavailable

log = logging.getLogger(__name__)

STOP_TIMEOUT = 5.0
STEADY = 60.0  # a watcher that ran this long restarts without waiting


class Watcher:
    """The watcher process of one `serve`: started, restarted when it exits, stopped."""

    def __init__(self, settings: ServeSettings) -> None:
        self._directory = tempfile.mkdtemp(prefix="locust-webhook-feed-")
        self.path = os.path.join(self._directory, "feed.sock")
        self._command = [
            sys.executable, "-m", __name__,
            "--socket", self.path,
            "--lookup-timeout", str(settings.lookup_timeout),
            "--log-level", settings.log_level,
            *(f"--namespace={namespace}" for namespace in settings.namespaces),
        ]  # fmt: skip
        self._owner = os.getpid()
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # stop() sees the newest process, even one starting
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process; raises SourceUnavailable with its reason if it cannot watch."""
        self._spawn()
        threading.Thread(target=self._supervise, name="watcher-supervisor", daemon=True).start()

    def stop(self) -> None:
        """Stop the process (from the process that started it; forked workers pass through)."""
        if os.getpid() != self._owner:
            return
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self._directory, ignore_errors=True)

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                raise SourceUnavailable("serve is stopping")
            # Its TMPDIR is in the private directory stop() removes, emptied for each process:
            # the Kubernetes client writes a kubeconfig's embedded certificates and key to
            # temporary files, and deletes them only at an exit this process never makes
            # (SIGTERM, os._exit). No earlier watcher process runs any more.
            scratch = os.path.join(self._directory, "tmp")
            shutil.rmtree(scratch, ignore_errors=True)
            os.mkdir(scratch, 0o700)
            process = self._process = subprocess.Popen(
                self._command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "TMPDIR": scratch},
            )
        assert process.stdout is not None
        report = process.stdout.readline().decode().strip()
        process.stdout.close()
        if report != "ok":
            process.wait()
            forget_process(process.pid)  # it may have set its gauges before failing
            raise SourceUnavailable(
                report.removeprefix("error: ")
                or f"the LocustTest watcher process exited with code {process.returncode}"
            )

    def _supervise(self) -> None:
        backoff = Backoff()
        while True:
            assert self._process is not None
            started = time.monotonic()
            # 0 when gunicorn's master collected its status first (it waits for any child); the
            # watcher never exits 0 by itself while `serve` runs.
            code = self._process.wait() or "unknown"
            if self._stopping.is_set():
                return
            forget_process(self._process.pid)
            if time.monotonic() - started > STEADY:
                backoff.reset()
            log.error("the LocustTest watcher process exited (code %s), restarting it", code)
            while not self._stopping.wait(backoff.next()):
                try:
                    self._spawn()
                    break
                except (SourceUnavailable, OSError) as exc:
                    if not self._stopping.is_set():
                        log.error("cannot restart the LocustTest watcher process: %s", exc)
            else:
                return


def forget_process(pid: int) -> None:
    """Drop the live gauges of an exited process (the watcher, a worker) from /metrics."""
    from prometheus_client import multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _exit_with_parent() -> None:
    sys.stdin.buffer.read()  # returns at EOF: `serve` and its workers are gone
    os._exit(0)


def _report_failure(reason: str) -> int:
    """Tell `serve` (Watcher._spawn reads this line) why the process cannot watch."""
    print("error: " + " ".join(reason.split()), flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--namespace", action="append", default=[])
    parser.add_argument("--lookup-timeout", type=float, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    # Ctrl-C reaches the whole process group: `serve` stops this process itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from . import logs
    from .cache import ClusterSource
    from .feed import FeedServer

    logs.configure(args.log_level)
    try:
        feed = FeedServer(args.socket)
    except OSError as exc:
        return _report_failure(f"cannot listen on the feed socket {args.socket}: {exc}")
    try:
        source = ClusterSource.from_environment(
            tuple(args.namespace), args.lookup_timeout, listener=feed
        )
    except (SourceUnavailable, OSError) as exc:
        return _report_failure(str(exc))
    print("ok", flush=True)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    feed.run(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
