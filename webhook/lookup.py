"""Where LocustTests come from: the `LocustTestSource` protocol and the directory source."""

from __future__ import annotations

import logging
import os
import random
import threading
from pathlib import Path
from typing import Protocol

import yaml

from .models import InvalidLocustTest, LocustTestInfo, parse_locusttest

log = logging.getLogger(__name__)
# libyaml's loader when PyYAML was built with it: 10x faster on directories of many tests.
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


BACKOFF_START = 0.2
BACKOFF_CAP = 30.0


class Backoff:
    """Exponential backoff with jitter, from BACKOFF_START up to BACKOFF_CAP."""

    def __init__(self) -> None:
        self._ceiling = BACKOFF_START

    def next(self) -> float:
        delay = random.uniform(self._ceiling / 2, self._ceiling)
        self._ceiling = min(self._ceiling * 2, BACKOFF_CAP)
        return delay

    def reset(self) -> None:
        self._ceiling = BACKOFF_START


class SourceUnavailable(Exception):
    """The LocustTest could not be looked up (API unreachable, RBAC missing, the watcher process
    away or busy), or the watcher process cannot start. The message is the reason alone."""


class LocustTestSource(Protocol):
    """A read-only view of the LocustTests the webhook may consult."""

    def start(self) -> None:
        """Begin feeding the source (threads, watches). Called once per worker, after fork."""

    def stop(self) -> None:
        """Stop background work; lookups may still answer from what is known."""

    def ready(self) -> bool:
        """True once the source has loaded a complete view at least once."""

    def size(self) -> int:
        """How many LocustTests are known."""

    def get(self, namespace: str, name: str) -> LocustTestInfo | None:
        """The LocustTest `name` in `namespace`, None when it does not exist.

        Raises SourceUnavailable when the answer cannot be known.
        """


def _load_dir(directory: Path) -> dict[tuple[str, str], LocustTestInfo]:
    tests: dict[tuple[str, str], LocustTestInfo] = {}
    for path in sorted(directory.glob("*.y*ml")):
        try:
            documents = list(yaml.load_all(path.read_text(), Loader=SafeLoader))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        for doc in documents:
            if not isinstance(doc, dict) or doc.get("kind") != "LocustTest":
                continue
            try:
                info = parse_locusttest(doc)
            except InvalidLocustTest as exc:
                log.warning("skipping a LocustTest in %s: %s", path, exc)
                continue
            if info.problem:
                where = f"{info.namespace}/{info.name} in {path}"
                log.warning("invalid LocustTest %s: %s", where, info.problem)
            # v2 wins over v1 for the same name, as it does when the API is asked.
            key = (info.namespace, info.name)
            if key not in tests or info.api_version.endswith("/v2"):
                tests[key] = info
    return tests


class DirectorySource:
    """LocustTests from the YAML files of one directory (objects without a namespace are in
    `default`); the directory is re-read when a file in it changes."""

    def __init__(self, directory: str | os.PathLike[str], poll_seconds: float = 2.0) -> None:
        self._directory = Path(directory)
        if not self._directory.is_dir():
            raise ValueError(f"--locusttests: {self._directory} is not a directory")
        self._poll_seconds = poll_seconds
        self._stamp = self._fingerprint()
        self._tests = _load_dir(self._directory)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        stats = ((p.name, p.stat()) for p in sorted(self._directory.glob("*.y*ml")))
        return tuple((name, st.st_mtime_ns, st.st_size) for name, st in stats)

    def _poll(self) -> None:
        while not self._stopped.wait(self._poll_seconds):
            try:
                stamp = self._fingerprint()
                if stamp != self._stamp:
                    self._stamp = stamp
                    self._tests = _load_dir(self._directory)
                    self._publish()
                    log.info("reloaded %d LocustTests from %s", len(self._tests), self._directory)
            except OSError:
                continue  # a file went away while it was read: the next poll sees the rest
            except Exception:  # the thread must outlive one bad reload: log it and go on
                log.exception("reading LocustTests from %s failed", self._directory)

    def _publish(self) -> None:
        from . import metrics

        metrics.CACHE_SIZE.set(len(self._tests))
        metrics.CACHE_SYNCED.set(1)

    def start(self) -> None:
        self._publish()
        self._thread = threading.Thread(target=self._poll, name="locusttest-dir", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def ready(self) -> bool:
        return True

    def size(self) -> int:
        return len(self._tests)

    def get(self, namespace: str, name: str) -> LocustTestInfo | None:
        return self._tests.get((namespace, name))
