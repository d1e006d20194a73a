"""The admission log lines: batched, in order, none lost, and on their way within FLUSH_SECONDS."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import orjson
import pytest

from webhook.logs import FLUSH_SECONDS, LineBuffer


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
