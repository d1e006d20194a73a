"""Structured logging: one JSON object per line, with the fields a record carries in `extra`."""

from __future__ import annotations

import atexit
import logging
import logging.config
import os
import select
import threading
import time
from typing import Any

import orjson
from gunicorn.glogging import Logger

RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _timestamp(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


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


class LineBuffer:
    """Lines gathered in memory and written in batches of at most PIPE_BUF bytes: every
    FLUSH_SECONDS by `start()`'s thread, at once when a batch is full, and on `flush()`.

    A write(2) per admission, and the wake-up of whoever reads the pipe behind stderr (the
    container runtime), cost more than the rest of an answer from the memo. Batches up to
    PIPE_BUF reach a pipe whole, so lines of the workers sharing it never interleave; the lock
    keeps them in order. Lines are at most FLUSH_SECONDS late; workers flush on their way out.
    """

    def __init__(self, fd: int = 2) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._lines: list[bytes] = []
        self._size = 0
        self._stopped = threading.Event()

    def write(self, line: bytes) -> None:
        with self._lock:
            if self._lines and self._size + len(line) > select.PIPE_BUF:
                self._write_out()
            self._lines.append(line)
            self._size += len(line)

    def flush(self) -> None:
        with self._lock:
            self._write_out()

    def _write_out(self) -> None:
        if not self._lines:
            return
        data = memoryview(b"".join(self._lines))
        self._lines.clear()
        self._size = 0
        while data:
            data = data[os.write(self._fd, data) :]

    def start(self) -> None:
        """Flush every FLUSH_SECONDS until `stop()`, from a daemon thread."""

        def run() -> None:
            while not self._stopped.wait(FLUSH_SECONDS):
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
    """Apply `dict_config` (for processes that are not gunicorn's)."""
    logging.config.dictConfig(dict_config(level))


class GunicornLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger without its access log. A logging config turns gunicorn's access log
    on, and it formats a line per request even when that line is then dropped: ~5% of a
    worker's time. The webhook logs its own line per admission instead."""

    @property
    def access_log_enabled(self) -> bool:
        return False
