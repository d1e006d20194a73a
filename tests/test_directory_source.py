"""`serve --locusttests DIR`: LocustTests from YAML files, re-read when the directory changes;
a file that cannot be read is skipped with a warning and never stops the others."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from fixtures import locusttest
from test_cache import wait_until

from webhook.lookup import DirectorySource

LATIN_1 = "# caf\xe9\nkind: LocustTest\n".encode("latin-1")  # not UTF-8


def write(directory: Path, name: str, test_name: str) -> None:
    (directory / name).write_text(yaml.safe_dump(locusttest(test_name)))


def test_a_file_that_is_not_utf8_is_skipped_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, "a.yaml", "good")
    (tmp_path / "b.yaml").write_bytes(LATIN_1)
    source = DirectorySource(tmp_path)
    assert source.get("default", "good") is not None
    assert source.size() == 1
    assert "skipping" in caplog.text and "b.yaml" in caplog.text


def test_the_directory_is_still_followed_after_a_bad_file_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="webhook.lookup")
    write(tmp_path, "a.yaml", "first")
    source = DirectorySource(tmp_path, poll_seconds=0.02)
    source.start()
    try:
        (tmp_path / "b.yaml").write_bytes(LATIN_1)
        wait_until(lambda: "b.yaml" in caplog.text)
        write(tmp_path, "c.yaml", "later")
        wait_until(lambda: source.get("default", "later") is not None)
        assert source.get("default", "first") is not None
    finally:
        source.stop()
