"""The failure policy (SPEC section 7) for internal errors: in the LocustTest lookup and in the
mutation. The pod is admitted unchanged with a warning, logged and counted, unless the webhook
fails closed or the LocustTest is required. And the admission line names the LocustTest."""

from __future__ import annotations

import logging
import os
from typing import Any

import orjson
import pytest
from conftest import Source
from fixtures import locusttest, operator_pod
from prometheus_client import REGISTRY
from test_memo import admit

from webhook import handler as handler_module
from webhook import logs
from webhook.config import MutationSettings
from webhook.handler import Handler
from webhook.models import LocustTestInfo


class BrokenSource(Source):
    """A LocustTest source with a bug: every lookup raises."""

    def get(self, namespace: str, name: str) -> LocustTestInfo | None:
        raise RuntimeError("the cache is corrupt")


def admissions(outcome: str, reason: str) -> float:
    labels = {"outcome": outcome, "reason": reason}
    return REGISTRY.get_sample_value("locust_webhook_admissions_total", labels) or 0.0


def test_a_failing_lookup_admits_the_pod_unchanged_with_a_warning_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = admissions("failed_open", "internal-error")
    with caplog.at_level(logging.ERROR, logger="webhook.admission"):
        response = admit(Handler(BrokenSource(), MutationSettings()), operator_pod("t", "master"))
    assert response["allowed"] is True
    assert "patch" not in response
    assert response["warnings"] == [
        "LocustTest default/t: internal error while reading it: observability was not injected"
    ]
    assert admissions("failed_open", "internal-error") == before + 1
    (record,) = [r for r in caplog.records if r.getMessage() == "LocustTest lookup failed"]
    assert record.exc_info is not None and "the cache is corrupt" in str(record.exc_info[1])


def test_a_failing_lookup_is_denied_when_failing_closed() -> None:
    handler = Handler(BrokenSource(), MutationSettings(), failure_policy="closed")
    response = admit(handler, operator_pod("t", "worker"))
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    assert "internal error while reading it" in response["status"]["message"]


@pytest.mark.parametrize(
    ("annotations", "allowed"),
    [(None, True), ({"observability.locust.io/required": "true"}, False)],
)
def test_a_failing_mutation_follows_the_policy_and_the_required_annotation(
    monkeypatch: pytest.MonkeyPatch, annotations: dict[str, str] | None, allowed: bool
) -> None:
    def broken(*_: Any) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(handler_module, "mutate", broken)
    handler = Handler(Source(locusttest("t", annotations=annotations)), MutationSettings())
    response = admit(handler, operator_pod("t", "master"))
    assert response["allowed"] is allowed
    message = "LocustTest default/t: internal error while injecting observability"
    if allowed:
        assert response["warnings"] == [message]
        assert "patch" not in response
    else:
        assert response["status"]["message"] == message


def admission_line(
    monkeypatch: pytest.MonkeyPatch, handler: Handler, pod: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The answer to one pod, and the admission line it was logged with."""
    read_end, write_end = os.pipe()
    try:
        buffer = logs.LineBuffer(write_end)
        monkeypatch.setattr(logs, "LINES", buffer)
        response = admit(handler, pod)
        buffer.flush()
        line: dict[str, Any] = orjson.loads(os.read(read_end, 1 << 16))
    finally:
        os.close(read_end)
        os.close(write_end)
    return response, line


def test_the_admission_line_names_the_locusttest_that_was_not_found(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="webhook.admission")
    _, line = admission_line(
        monkeypatch, Handler(Source(), MutationSettings()), operator_pod("nosuch", "master")
    )
    assert (line["locusttest"], line["outcome"], line["reason"]) == (
        "nosuch",
        "failed_open",
        "locusttest-not-found",
    )


def test_a_pod_name_that_is_not_a_string_is_answered_and_logged_without_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the fuzzer: a generateName nested deeper than JSON encoders go made the
    admission line fail, and the request a 500 instead of an answer."""
    caplog.set_level(logging.INFO, logger="webhook.admission")
    pod = operator_pod("nosuch", "master")
    nested: Any = "x"
    for _ in range(130):  # 260 levels: orjson encodes 254 at most
        nested = [{"a": nested}]
    pod["metadata"]["generateName"] = nested
    response, line = admission_line(monkeypatch, Handler(Source(), MutationSettings()), pod)
    assert response["allowed"] is True
    assert line["pod"] == ""
