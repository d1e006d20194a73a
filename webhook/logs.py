"""Structured logging: one JSON object per line, with the fields a record carries in `extra`."""

from __future__ import annotations

import logging
import logging.config
import os
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


def admission(fields: dict[str, Any]) -> None:
    """The one line per admission, in the same JSON shape as every other line. Written with a
    single write(2) (atomic for a line this size, so threads need no lock): the logging
    module costs ~10x as much, on every request."""
    if ADMISSION.isEnabledFor(logging.INFO):
        line = {
            "time": _timestamp(time.time()),
            "level": "info",
            "logger": ADMISSION.name,
            "message": "admission",
            **fields,
        }
        os.write(2, orjson.dumps(line, default=str, option=orjson.OPT_APPEND_NEWLINE))


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
