"""The failure policy (SPEC section 7) for internal errors and an unreachable API: in the
LocustTest lookup and in the mutation. The pod is admitted unchanged with a warning, logged and
counted, unless the webhook fails closed or the LocustTest is required. And what the handler
skips without a lookup, the namespace it looks in, and the admission line and metrics it leaves."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import Source
from fixtures import locusttest, operator_pod
from kubeapi import FakeKubeAPI
from kubernetes import config
from prometheus_client import REGISTRY
from test_memo import ENDPOINT, admit, env_of

from webhook import handler as handler_module
from webhook import logs
from webhook.cache import ClusterSource
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
    message = (
        "LocustTest default/t: internal error while mutating the pod: "
        "observability was not injected"
    )
    if allowed:
        assert response["warnings"] == [message]
        assert "patch" not in response
    else:
        assert response["status"]["message"] == message


def admission_line(
    monkeypatch: pytest.MonkeyPatch, handler: Handler, pod: dict[str, Any], **options: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The answer to one pod, and the admission line it was logged with (`options` as admit's)."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)  # no line logged: BlockingIOError, not a hang
    try:
        buffer = logs.LineBuffer(write_end)
        monkeypatch.setattr(logs, "LINES", buffer)
        response = admit(handler, pod, **options)
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


@pytest.mark.parametrize(("policy", "outcome"), [("open", "failed_open"), ("closed", "denied")])
def test_an_invalid_locusttest_is_its_own_reason_under_either_policy(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, policy: str, outcome: str
) -> None:
    caplog.set_level(logging.INFO, logger="webhook.admission")
    broken = locusttest("broken", annotations={"team": "a"})
    broken["spec"]["observability"] = "on"
    handler = Handler(Source(broken), MutationSettings(), policy)
    response, line = admission_line(monkeypatch, handler, operator_pod("broken", "master"))
    assert (line["locusttest"], line["outcome"], line["reason"]) == (
        "broken",
        outcome,
        "locusttest-invalid",
    )
    assert response["allowed"] is (policy == "open")


def test_names_longer_than_kubernetes_allows_are_cut_or_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No object name is longer than 253 characters: the pod's is cut in the log line, and a
    LocustTest name that long is not looked up (nor echoed in the warning and the line)."""
    caplog.set_level(logging.INFO, logger="webhook.admission")
    source = BrokenSource()  # a lookup would raise
    pod = operator_pod("t" * 254, "master")
    pod["metadata"]["generateName"] = "p" * 100_000
    response, line = admission_line(monkeypatch, Handler(source, MutationSettings()), pod)
    assert response["allowed"] is True and "patch" not in response
    assert response["warnings"] == [
        "pod not mutated: its performance-test-name label is longer than any name"
    ]
    assert (line["pod"], line["locusttest"], line["reason"]) == ("p" * 253, "", "malformed-pod")
    at_most = operator_pod("t" * 253, "master")
    response, line = admission_line(monkeypatch, Handler(Source(), MutationSettings()), at_most)
    assert (line["locusttest"], line["reason"]) == ("t" * 253, "locusttest-not-found")


def test_a_namespace_only_the_pod_gives_is_refused_when_longer_than_any_namespace(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A review without request.namespace (no API server sends one) falls back to the pod's
    metadata.namespace, which parse_review did not check: not looked up, nor echoed."""
    caplog.set_level(logging.INFO, logger="webhook.admission")
    pod = operator_pod("demo", "master")
    pod["metadata"]["namespace"] = "n" * 100_000
    handler = Handler(BrokenSource(), MutationSettings())
    response, line = admission_line(monkeypatch, handler, pod, namespace="")
    assert response["warnings"] == [
        "pod not mutated: metadata.namespace is longer than a namespace name"
    ]
    assert line["reason"] == "malformed-pod"
    for value in (["team-a"], 0):  # not a name at all
        pod["metadata"]["namespace"] = value
        response, line = admission_line(monkeypatch, handler, pod, namespace="")
        assert response["warnings"] == ["pod not mutated: metadata.namespace must be a string"]
        assert line["reason"] == "malformed-pod"


def test_a_patch_the_answer_cannot_encode_follows_the_failure_policy(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """orjson reads deeper JSON than it writes: 300 levels of lists in a container the patch
    carries (two exporters of one name, removed: the diff pairs the helper with the first) are
    an internal error under the failure policy, not an HTML 500."""
    caplog.set_level(logging.INFO, logger="webhook.admission")
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    pod = operator_pod("t", "worker")
    exporter = {"name": "locust-metrics-exporter", "image": "e"}
    helper = {"name": "helper", "image": "busybox", "resources": {"limits": deep}}
    pod["spec"]["containers"] += [exporter, helper, exporter]
    handler = Handler(Source(locusttest("t", otel={"enabled": True})), MutationSettings())
    response, line = admission_line(monkeypatch, handler, pod)
    assert response["allowed"] is True and "patch" not in response
    assert response["warnings"] == [
        "LocustTest default/t: internal error while mutating the pod: "
        "observability was not injected"
    ]
    assert (line["outcome"], line["reason"]) == ("failed_open", "internal-error")


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


def lookups(result: str) -> float:
    return REGISTRY.get_sample_value("locust_webhook_lookups_total", {"result": result}) or 0.0


def test_an_unreachable_api_fails_open_and_the_lookup_is_counted_once(tmp_path: Path) -> None:
    """The source counts its own failed lookups; the handler counts the admission."""
    failed, unavailable = admissions("failed_open", "api-unavailable"), lookups("unavailable")
    with FakeKubeAPI() as api:
        api.forbid = True  # a 403 is not retried: the lookup fails at once
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        api_client = config.new_client_from_config(config_file=str(kubeconfig))
        try:
            source = ClusterSource(api_client, lookup_timeout=0.5)
            response = admit(Handler(source, MutationSettings()), operator_pod("demo", "master"))
        finally:
            api_client.close()
    assert response["allowed"] is True and "patch" not in response
    assert response["warnings"] == [
        "LocustTest default/demo: could not be read ("
        "RBAC: the service account cannot get locusttests.locust.io (needs get, list, watch)): "
        "observability was not injected"
    ]
    assert admissions("failed_open", "api-unavailable") == failed + 1
    assert lookups("unavailable") == unavailable + 1


def opted_out_pod() -> dict[str, Any]:
    return operator_pod("demo", "master", annotations={"observability.locust.io/inject": "false"})


def unlabelled_pod() -> dict[str, Any]:
    pod = operator_pod("demo", "master")
    pod["metadata"]["labels"]["performance-test-name"] = ""
    return pod


@pytest.mark.parametrize(
    ("pod", "reason"), [(opted_out_pod(), "opted-out"), (unlabelled_pod(), "no-test-label")]
)
def test_pods_left_alone_are_not_looked_up_even_when_failing_closed(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    pod: dict[str, Any],
    reason: str,
) -> None:
    """No LocustTest exists: looking it up would deny the pod."""
    caplog.set_level(logging.INFO, logger="webhook.admission")
    handler = Handler(Source(), MutationSettings(), failure_policy="closed")
    response, line = admission_line(monkeypatch, handler, pod)
    assert response == {"uid": line["uid"], "allowed": True}
    assert (line["outcome"], line["reason"]) == ("skipped", reason)


def test_requests_other_than_a_pod_create_are_skipped_as_such(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="webhook.admission")
    handler = Handler(Source(locusttest("demo")), MutationSettings())
    pod = operator_pod("demo", "master")
    response, line = admission_line(monkeypatch, handler, pod, operation="UPDATE")
    assert response == {"uid": line["uid"], "allowed": True}
    assert (line["outcome"], line["reason"]) == ("skipped", "not-pod-create")


def test_a_pod_that_already_has_it_all_is_counted_unchanged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    handler = Handler(Source(locusttest("demo", otel={"enabled": True})), MutationSettings())
    patched = admit(handler, operator_pod("demo", "worker"))["pod"]
    caplog.set_level(logging.INFO, logger="webhook.admission")
    before = admissions("unchanged", "otel")
    response, line = admission_line(monkeypatch, handler, patched)
    assert "patch" not in response
    assert (line["outcome"], line["reason"]) == ("unchanged", "otel")
    assert admissions("unchanged", "otel") == before + 1


def test_a_job_name_the_operator_would_not_give_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = Handler(Source(locusttest("demo", otel={"enabled": True})), MutationSettings())
    pod = operator_pod("demo", "worker")
    pod["metadata"]["ownerReferences"][0]["name"] = "hand-made"
    with caplog.at_level(logging.WARNING, logger="webhook.admission"):
        response = admit(handler, pod, uid="mismatch")
    assert "patch" in response
    (record,) = caplog.records
    assert record.getMessage() == (
        "owning Job 'hand-made' is not 'demo-worker', the name the operator gives it"
    )
    assert (record.uid, record.locusttest) == ("mismatch", "demo")


def test_a_request_without_a_namespace_is_skipped_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="webhook.admission")
    handler = Handler(Source(locusttest("demo")), MutationSettings())
    response, line = admission_line(
        monkeypatch, handler, operator_pod("demo", "master"), namespace=""
    )
    assert response["allowed"] is True and "patch" not in response
    assert response["warnings"] == ["pod not mutated: the request has no namespace"]
    assert (line["outcome"], line["reason"]) == ("skipped", "malformed-pod")


def test_the_locusttest_is_looked_up_in_the_request_namespace() -> None:
    """request.namespace decides; the pod's own metadata.namespace only stands in when the
    request has none."""
    otel = {"enabled": True, "endpoint": ENDPOINT}
    handler = Handler(Source(locusttest("demo", "team-a", otel=otel)), MutationSettings())
    pod = operator_pod("demo", "worker")
    pod["metadata"]["namespace"] = "team-b"
    response = admit(handler, pod, "team-a")
    assert "k8s.namespace.name=team-a" in env_of(response)["OTEL_RESOURCE_ATTRIBUTES"]
    pod["metadata"]["namespace"] = "team-a"
    response = admit(handler, pod, "")
    assert "k8s.namespace.name=team-a" in env_of(response)["OTEL_RESOURCE_ATTRIBUTES"]


@pytest.mark.parametrize("dry_run", [True, False])
def test_the_admission_line_says_whether_it_was_a_dry_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, dry_run: bool
) -> None:
    caplog.set_level(logging.INFO, logger="webhook.admission")
    handler = Handler(Source(locusttest("demo")), MutationSettings())
    pod = operator_pod("demo", "master")
    _, line = admission_line(monkeypatch, handler, pod, dry_run=dry_run)
    assert line["dry_run"] is dry_run


def test_the_admission_line_carries_the_answers_warnings(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The Job controller creates the pods and drops the answer's warnings: the log line is
    where they can be read."""
    caplog.set_level(logging.INFO, logger="webhook.admission")
    test = locusttest("demo", otel={"enabled": True, "endpoint": "otel:4317"})
    handler = Handler(Source(test), MutationSettings())
    response, line = admission_line(monkeypatch, handler, operator_pod("demo", "worker"))
    assert "no scheme" in response["warnings"][0]
    assert line["warnings"] == response["warnings"]
    _, quiet = admission_line(monkeypatch, handler, operator_pod("other", "worker"))
    assert quiet["reason"] == "locusttest-not-found"
    assert quiet["warnings"] == [
        "LocustTest default/other: not found: observability was not injected"
    ]
    handler = Handler(Source(locusttest("demo")), MutationSettings())
    response, line = admission_line(monkeypatch, handler, operator_pod("demo", "master"))
    assert "warnings" not in response and "warnings" not in line


@pytest.mark.parametrize(("policy", "allowed"), [("open", True), ("closed", False)])
def test_a_pod_outside_the_watched_namespaces_gets_the_failure_policy_without_a_lookup(
    policy: str, allowed: bool
) -> None:
    # The LocustTest exists: "not found" would send the user looking for the wrong thing.
    source = BrokenSource(locusttest("t", namespace="team-c"))
    handler = Handler(source, MutationSettings(), policy, namespaces=("team-a", "team-b"))
    before = admissions("failed_open" if allowed else "denied", "namespace-not-watched")
    response = admit(handler, operator_pod("t", "master"), namespace="team-c")
    assert response["allowed"] is allowed
    message = (
        "LocustTest team-c/t: namespace team-c is not among the webhook's --namespaces: "
        "observability was not injected"
    )
    assert (response["warnings"] if allowed else [response["status"]["message"]]) == [message]
    assert admissions("failed_open" if allowed else "denied", "namespace-not-watched") == before + 1
    watched = admit(handler, operator_pod("t", "master"), namespace="team-a")
    assert "internal error while reading it" in orjson.dumps(watched).decode()  # looked up
