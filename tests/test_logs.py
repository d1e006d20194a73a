"""The admission log lines: batched, in order, none lost, and on their way within FLUSH_SECONDS."""

from __future__ import annotations

import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import orjson
import pytest

from webhook import logs
from webhook.logs import FLUSH_SECONDS, JsonFormatter, LineBuffer


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


def reads(fd: int) -> list[bytes]:
    """What can be read now, one read(2) at a time (on a message socket: one write each)."""
    chunks = []
    while True:
        try:
            chunks.append(os.read(fd, 1 << 16))
        except BlockingIOError:
            return chunks


def drain(fd: int) -> bytes:
    return b"".join(reads(fd))


def line(thread: int, number: int) -> bytes:
    return orjson.dumps({"thread": thread, "n": number, "pad": "x" * 150}) + b"\n"


def test_concurrent_writers_lose_no_line_and_keep_each_threads_order(
    pipe: tuple[int, int],
) -> None:
    read_end, write_end = pipe
    buffer = LineBuffer(write_end)
    received = bytearray()
    stop_reading = threading.Event()

    def reader() -> None:  # the pipe holds 64 KB: keep it drained, as the runtime does
        while not stop_reading.is_set():
            received.extend(drain(read_end))
            time.sleep(0.001)

    reading = threading.Thread(target=reader)
    reading.start()
    writers = [
        threading.Thread(target=lambda t=t: [buffer.write(line(t, n)) for n in range(2000)])
        for t in range(8)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    buffer.stop()
    stop_reading.set()
    reading.join()
    received.extend(drain(read_end))

    records = [orjson.loads(raw) for raw in bytes(received).splitlines()]
    assert len(records) == 8 * 2000
    for thread in range(8):
        assert [r["n"] for r in records if r["thread"] == thread] == list(range(2000))


@pytest.fixture
def messages() -> Iterator[tuple[int, int]]:
    """(read end, write end) of a message socket: each write(2) stays a message of its own, so
    the batches can be seen one by one."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    with ours, theirs:
        yield theirs.fileno(), ours.fileno()


def test_lines_wait_for_a_flush_then_go_in_whole_batches_within_pipe_buf(
    messages: tuple[int, int],
) -> None:
    read_end, write_end = messages
    buffer = LineBuffer(write_end)
    sent = [line(0, n) for n in range(100)]
    for item in sent:
        buffer.write(item)
    before_flush = reads(read_end)
    buffer.flush()
    batches = reads(read_end)
    assert before_flush == []  # no write(2) on the request's path
    assert len(batches) >= 4  # ~17 KB of lines
    assert all(0 < len(b) <= select.PIPE_BUF and b.endswith(b"\n") for b in batches)
    assert b"".join(batches) == b"".join(sent)


def test_past_the_high_water_mark_the_writer_flushes_itself(
    messages: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("webhook.logs.HIGH_WATER", 10)
    read_end, write_end = messages
    buffer = LineBuffer(write_end)
    for n in range(25):
        buffer.write(line(0, n))
    assert drain(read_end) == b"".join(line(0, n) for n in range(20))


def test_the_flusher_writes_waiting_lines_within_the_flush_interval(
    pipe: tuple[int, int],
) -> None:
    read_end, write_end = pipe
    buffer = LineBuffer(write_end)
    buffer.start()
    try:
        buffer.write(line(0, 1))
        assert drain(read_end) == b""
        deadline = time.monotonic() + 20 * FLUSH_SECONDS
        seen = b""
        while not seen and time.monotonic() < deadline:
            time.sleep(FLUSH_SECONDS / 4)
            seen = drain(read_end)
        assert seen == line(0, 1)
    finally:
        buffer.stop()


def test_stop_writes_what_is_waiting(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    buffer = LineBuffer(write_end)
    buffer.write(line(0, 1))
    buffer.write(line(0, 2))
    buffer.stop()
    assert drain(read_end) == line(0, 1) + line(0, 2)


def test_the_flusher_outlives_a_write_error(pipe: tuple[int, int]) -> None:
    """stderr gone for a while (EPIPE) must not stop the lines that follow once it is back."""
    read_end, write_end = pipe
    broken_read, broken_write = os.pipe()
    os.close(broken_read)
    target = os.dup(broken_write)  # the buffer's fd: first a pipe nobody reads, then ours
    os.close(broken_write)
    buffer = LineBuffer(target)
    buffer.start()
    try:
        buffer.write(line(0, 1))
        time.sleep(3 * FLUSH_SECONDS)  # lets the flusher meet the error
        os.dup2(write_end, target)
        buffer.write(line(0, 2))
        deadline = time.monotonic() + 20 * FLUSH_SECONDS
        seen = b""
        while line(0, 2) not in seen and time.monotonic() < deadline:
            time.sleep(FLUSH_SECONDS / 4)
            seen += drain(read_end)
        assert seen.endswith(line(0, 2))
    finally:
        buffer.stop()
        os.close(target)


def test_a_writer_past_the_high_water_mark_outlives_a_write_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request thread that flushes past HIGH_WATER meets stderr's EPIPE: the admission it
    is logging must still be answered (it raised, an HTTP 500), and the queue stays bounded."""
    monkeypatch.setattr("webhook.logs.HIGH_WATER", 10)
    broken_read, broken_write = os.pipe()
    os.close(broken_read)
    buffer = LineBuffer(broken_write)
    try:
        for n in range(25):
            buffer.write(line(0, n))
        assert len(buffer._queue) < 10
    finally:
        os.close(broken_write)


def test_admission_lines_follow_the_log_level(
    pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    read_end, write_end = pipe
    buffer = LineBuffer(write_end)
    monkeypatch.setattr(logs, "LINES", buffer)
    level = logs.ADMISSION.level
    try:
        logs.ADMISSION.setLevel(logging.WARNING)
        logs.admission({"uid": "quiet"})
        logs.ADMISSION.setLevel(logging.INFO)
        logs.admission({"uid": "heard"})
    finally:
        logs.ADMISSION.setLevel(level)
    buffer.flush()
    (only,) = [orjson.loads(raw) for raw in drain(read_end).splitlines()]
    assert (only["uid"], only["message"], only["level"]) == ("heard", "admission", "info")


def record(created: float, **extra: object) -> logging.LogRecord:
    item = logging.makeLogRecord(
        {"name": "webhook.tls", "levelno": logging.INFO, "levelname": "INFO", "msg": "m", **extra}
    )
    item.created = created
    return item


def test_json_lines_carry_the_time_to_the_millisecond_and_the_extra_fields() -> None:
    formatter = JsonFormatter()
    first = orjson.loads(formatter.format(record(1_700_000_000.25, peer="10.0.0.1")))
    later = orjson.loads(formatter.format(record(1_700_000_061.5)))
    assert first == {
        "time": "2023-11-14T22:13:20.250Z",
        "level": "info",
        "logger": "webhook.tls",
        "message": "m",
        "peer": "10.0.0.1",
    }
    assert later["time"] == "2023-11-14T22:14:21.500Z"


def test_json_lines_carry_the_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        item = record(1_700_000_000.0, exc_info=sys.exc_info())
    text = orjson.loads(JsonFormatter().format(item))["exception"]
    assert text.startswith("Traceback") and "RuntimeError: boom" in text


def test_python_warnings_in_the_watcher_process_are_json_lines_and_said_once() -> None:
    """The watcher's Kubernetes client warns through Python's warnings (urllib3: a kubeconfig
    that skips certificate checks, once per request): JSON like every other line, and once."""
    script = (
        "import warnings\n"
        "from webhook import logs\n"
        "logs.configure('info')\n"
        "for _ in range(3):\n"
        "    warnings.warn('Unverified HTTPS request is being made to host', UserWarning)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    lines = [orjson.loads(line) for line in done.stderr.splitlines()]
    assert [(line["logger"], line["level"]) for line in lines] == [("py.warnings", "warning")]
    assert "Unverified HTTPS request" in lines[0]["message"]
