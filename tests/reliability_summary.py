"""The reliability summary: tests record (case, requests, failures); the table is printed at
the end of the run, with each case's pytest result.

Used through the `reliability` fixture, which registers the reporting plugin on first use, so
no conftest change is needed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

PLUGIN_NAME = "reliability-summary"


@dataclass
class Row:
    """One case of the table."""

    nodeid: str
    case: str
    requests: int = 0
    failures: int = 0
    result: str = "not run"


class Recorder:
    """What one test sent and how much of it failed; safe to use from client threads."""

    def __init__(self, row: Row) -> None:
        self.row = row
        self._lock = threading.Lock()

    def add(self, requests: int = 0, failures: int = 0) -> None:
        """Count `requests` sent, `failures` among them."""
        with self._lock:
            self.row.requests += requests
            self.row.failures += failures


class SummaryPlugin:
    """Collects rows and prints them in the terminal summary."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for row in self.rows:
            if row.nodeid != report.nodeid:
                continue
            if report.failed:
                row.result = "FAILED"
            elif report.when == "call" and report.passed and row.result == "not run":
                row.result = "passed"

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.rows:
            return
        width = max(len(row.case) for row in self.rows)
        terminalreporter.section("reliability summary")
        terminalreporter.write_line(f"{'case':<{width}}  {'requests':>8}  {'failures':>8}  result")
        for row in self.rows:
            terminalreporter.write_line(
                f"{row.case:<{width}}  {row.requests:>8}  {row.failures:>8}  {row.result}"
            )


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Recorder]:
    """A row of the summary table for this test."""
    manager = request.config.pluginmanager
    plugin = manager.get_plugin(PLUGIN_NAME)
    if plugin is None:
        plugin = SummaryPlugin()
        manager.register(plugin, PLUGIN_NAME)
    case = request.node.name.removeprefix("test_")
    row = Row(request.node.nodeid, case)
    plugin.rows.append(row)
    yield Recorder(row)
