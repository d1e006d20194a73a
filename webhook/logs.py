"""Structured logging: one JSON object per line, with the fields a record carries in `extra`."""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import logging.config
import os
import select
import threading
import time
import warnings
from typing import Any

import orjson
from gunicorn.glogging import Logger

RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


_second: tuple[int, str] = (0, "")


def _timestamp(created: float) -> str:
    global _second
    second, text = _second
    if int(created) != second:  # formatted once a second, not once a line
        second, text = int(created), time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        _second = (second, text)
    return f"{text}.{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ...extra fields}`; tracebacks in `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update((k, v) for k, v in record.__dict__.items() if k not in RESERVED)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


ADMISSION = logging.getLogger("webhook.admission")
FLUSH_SECONDS = 0.1
HIGH_WATER = 4096  # lines (~1.2 MB)


class LineBuffer:
    """Lines queued in memory and written by `start()`'s thread every FLUSH_SECONDS, in
    batches of at most PIPE_BUF bytes; by the writer itself when HIGH_WATER lines wait.

    A write(2) per admission, and the wake-up of whoever reads the pipe behind stderr (the
    container runtime), cost more than the rest of an answer from the memo; so does a lock
    that request threads would queue on while a batch is written. Appending to the deque
    needs no lock; the write lock keeps the batches in order. Batches up to PIPE_BUF reach a
    pipe whole, so the lines of the workers sharing it never interleave. Lines are at most
    FLUSH_SECONDS late; workers flush on their way out.
    """

    def __init__(self, fd: int = 2) -> None:
        self._fd = fd
        self._queue: collections.deque[bytes] = collections.deque()
        self._write_lock = threading.Lock()
        self._stopped = threading.Event()

    def write(self, line: bytes) -> None:
        self._queue.append(line)
        if len(self._queue) >= HIGH_WATER:  # the flusher is behind (a slow reader): help it
            # From a request thread: stderr gone (EPIPE) must not fail the admission.
            with contextlib.suppress(OSError):
                self.flush()

    def flush(self) -> None:
        with self._write_lock:
            batch: list[bytes] = []
            size = 0
            while self._queue:
                line = self._queue.popleft()
                if batch and size + len(line) > select.PIPE_BUF:
                    self._write(b"".join(batch))
                    batch, size = [], 0
                batch.append(line)
                size += len(line)
            if batch:
                self._write(b"".join(batch))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def start(self) -> None:
        """Flush every FLUSH_SECONDS until `stop()`, from a daemon thread."""

        def run() -> None:
            while not self._stopped.wait(FLUSH_SECONDS):
                # stderr gone (EPIPE, EBADF) leaves nowhere to say so; keep the thread alive
                # so that the queue keeps draining if it comes back.
                with contextlib.suppress(OSError):
                    self.flush()

        threading.Thread(target=run, name="log-flush", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        self.flush()


LINES = LineBuffer()
atexit.register(LINES.flush)


def admission(fields: dict[str, Any]) -> None:
    """The one line per admission, in the same JSON shape as every other line, through LINES
    (the logging module would cost ~10x as much, on every request)."""
    if ADMISSION.isEnabledFor(logging.INFO):
        line = {
            "time": _timestamp(time.time()),
            "level": "info",
            "logger": ADMISSION.name,
            "message": "admission",
            **fields,
        }
        LINES.write(orjson.dumps(line, default=str, option=orjson.OPT_APPEND_NEWLINE))


def dict_config(level: str) -> dict[str, Any]:
    """Every logger, gunicorn's included, as JSON lines on stderr. gunicorn's access log is
    dropped: the webhook logs one line per admission with more useful fields."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
        },
    }


def configure(level: str) -> None:
    """Apply `dict_config` (for processes that are not gunicorn's: the watcher's), with Python's
    warnings as JSON lines too; urllib3's warning about a kubeconfig that skips certificate
    checks (one per request to the API) once."""
    logging.config.dictConfig(dict_config(level))
    logging.captureWarnings(True)
    warnings.filterwarnings("once", message="Unverified HTTPS request")


class GunicornLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger without its access log. A logging config turns gunicorn's access log
    on, and it formats a line per request even when that line is then dropped: ~5% of a
    worker's time. The webhook logs its own line per admission instead. Without its
    "Listening at" line too: with reuse_port the master holds no socket, so the line has no
    address (`serve` logs the address it serves on instead)."""

    @property
    def access_log_enabled(self) -> bool:
        return False

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if msg.startswith("Listening at:") and not (args and args[0]):
            return
        super().info(msg, *args, **kwargs)
