"""Plumbing for the end-to-end tests: processes in their own groups with a hard cap, a local
HTTP target that counts what it served, dynamic ports, and condition waits with deadlines."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A loopback port free right now (the processes that take it bind it by number)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Return the first truthy `probe()`; for state only reachable by asking (HTTP endpoints)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def get_json(url: str, timeout: float = 2.0) -> Any | None:
    """GET a JSON document, or None while nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return json.loads(answer.read())
    except (OSError, urllib.error.URLError, ValueError):
        return None


class Process:
    """A child in its own process group, output to a file, killed by a watchdog at `cap` s."""

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], log_file: Path, cap: float
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_file = log_file
        with open(log_file, "wb") as log:
            self.popen = subprocess.Popen(
                argv,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=log_file.parent,
            )
        self.capped = False
        self._watchdog = threading.Timer(cap, self._cap)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _cap(self) -> None:
        self.capped = True
        self.signal_group(signal.SIGKILL)

    def signal_group(self, signum: int) -> None:
        if self.popen.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signum)

    def wait(self, timeout: float) -> int:
        """Exit code; raises TimeoutError (with the log) if it is still running."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"{self.name} still running after {timeout} s:\n{self.tail()}"
            ) from None

    def running(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the group, SIGKILL what is left after `grace`, reap, stop the watchdog."""
        self.signal_group(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.popen.wait()
        # a group may outlive its leader (grandchildren): kill the rest regardless
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._watchdog.cancel()
        self._watchdog.join()


class Processes:
    """Every process a test starts, stopped (group-wide) when the block exits."""

    def __init__(self, directory: Path, cap: float) -> None:
        self.directory = directory
        self.cap = cap
        self.started: list[Process] = []

    def start(self, name: str, argv: list[str], env: Mapping[str, str]) -> Process:
        process = Process(name, argv, env, self.directory / f"{name}.log", self.cap)
        self.started.append(process)
        return process

    def stop_all(self, grace: float = 5.0) -> None:
        for process in reversed(self.started):
            process.stop(grace)


@contextmanager
def processes(directory: Path, cap: float) -> Iterator[Processes]:
    group = Processes(directory, cap)
    try:
        yield group
    finally:
        group.stop_all()


class TargetServer:
    """The system under load: answers every GET with 200 and counts requests by path."""

    def __init__(self) -> None:
        hits: Counter[str] = Counter()
        lock = threading.Lock()
        self._hits, self._lock = hits, lock

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with lock:
                    hits[self.path.split("?", 1)[0]] += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    def hits(self) -> Counter[str]:
        with self._lock:
            return Counter(self._hits)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
