"""The handler's memo of identical pods: the pods of one Job are mutated once, and the memo
never answers for a pod, a LocustTest or a namespace other than the one it was computed for.
(tests/test_fuzz.py also checks, on fuzzed pods, that remembered answers equal fresh ones.)"""

from __future__ import annotations

import base64
import copy
import json
import logging
from typing import Any

import jsonpatch
import pytest
from conftest import Source, validate_pod
from fixtures import locusttest, operator_pod, review

from webhook import handler as handler_module
from webhook.config import MutationSettings
from webhook.handler import Handler

ENDPOINT = "http://otel-collector.monitoring:4317"


def admit(
    handler: Handler, pod: dict[str, Any], namespace: str = "default", **options: Any
) -> dict[str, Any]:
    """The response to a review of `pod` (a CREATE unless `options` for fixtures.review say
    otherwise); its patch, applied strictly to the pod, must be valid."""
    body = json.dumps(review(pod, namespace, **options)).encode()
    answer: dict[str, Any] = json.loads(handler.handle(body))
    response: dict[str, Any] = answer["response"]
    if "patch" in response:
        ops = json.loads(base64.b64decode(response["patch"]))
        response["ops"] = ops
        response["pod"] = jsonpatch.JsonPatch(ops).apply(copy.deepcopy(pod))
        validate_pod(response["pod"])
    return response


def env_of(response: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in response["pod"]["spec"]["containers"][0]["env"]}


def test_the_workers_of_one_job_are_mutated_once() -> None:
    handler = Handler(Source(locusttest("demo", otel={"enabled": True})), MutationSettings())
    worker = operator_pod("demo", "worker")
    answers = [admit(handler, worker) for _ in range(5)]
    assert len(handler._memo) == 1
    assert all(a["ops"] == answers[0]["ops"] for a in answers)
    assert len({a["uid"] for a in answers}) == 5


def test_a_long_patch_is_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a pod with odd containers makes one; 256 of them would hold the worker's memory."""
    handler = Handler(Source(locusttest("demo", otel={"enabled": True})), MutationSettings())
    worker = operator_pod("demo", "worker")
    first = admit(handler, worker)
    patch_chars = len(handler._memo.popitem()[1].patch)
    monkeypatch.setattr(handler_module, "MEMO_PATCH_CHARS", patch_chars - 1)
    again = admit(handler, worker)
    assert handler._memo == {}
    assert again["ops"] == first["ops"]
    monkeypatch.setattr(handler_module, "MEMO_PATCH_CHARS", patch_chars)
    admit(handler, worker)
    assert len(handler._memo) == 1


def test_a_changed_locusttest_is_not_answered_from_memory() -> None:
    source = Source(locusttest("demo", otel={"enabled": True, "endpoint": ENDPOINT}))
    handler = Handler(source, MutationSettings())
    worker = operator_pod("demo", "worker")
    assert env_of(admit(handler, worker))["OTEL_EXPORTER_OTLP_ENDPOINT"] == ENDPOINT
    source.put(locusttest("demo", otel={"enabled": True, "endpoint": "http://other:4317"}))
    assert env_of(admit(handler, worker))["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://other:4317"
    source.put(locusttest("demo"))
    assert "patch" not in admit(handler, worker)  # a worker without OTel is left alone


def test_the_same_pod_in_two_namespaces_gets_its_own_namespace() -> None:
    otel = {"enabled": True, "endpoint": ENDPOINT}
    source = Source(
        locusttest("demo", "team-a", otel=otel), locusttest("demo", "team-b", otel=otel)
    )
    handler = Handler(source, MutationSettings())
    worker = operator_pod("demo", "worker")
    for namespace in ("team-a", "team-b", "team-a"):
        attributes = env_of(admit(handler, worker, namespace))["OTEL_RESOURCE_ATTRIBUTES"]
        assert f"k8s.namespace.name={namespace}" in attributes


def test_absent_and_null_fields_get_patches_of_their_own() -> None:
    """`add` creates a missing member, `replace` needs it to exist: a pod with
    `annotations: null` or `initContainers: null` must not get the patch of a pod without them."""
    handler = Handler(Source(locusttest("demo")), MutationSettings())
    absent = operator_pod("demo", "master")
    nulls = copy.deepcopy(absent)
    nulls["metadata"]["annotations"] = None
    nulls["spec"]["initContainers"] = None
    for pod in (absent, nulls, absent, nulls):
        response = admit(handler, pod)
        assert response["pod"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert [c["name"] for c in response["pod"]["spec"]["initContainers"]] == [
            "locust-metrics-exporter"
        ]
    assert len(handler._memo) == 2


def test_a_full_memo_is_emptied_and_still_answers(monkeypatch: Any) -> None:
    monkeypatch.setattr("webhook.handler.MEMO_SIZE", 3)
    handler = Handler(Source(locusttest("demo", otel={"enabled": True})), MutationSettings())
    for index in range(7):
        pod = operator_pod("demo", "worker", extra_args=["-u", str(index)])
        assert "--otel" in admit(handler, pod)["pod"]["spec"]["containers"][0]["args"]
        assert 1 <= len(handler._memo) <= 3


def test_large_pods_are_remembered_by_digest_and_told_apart() -> None:
    handler = Handler(Source(locusttest("demo", otel={"enabled": True})), MutationSettings())
    worker = operator_pod("demo", "worker")
    worker["spec"]["containers"][0]["env"] = [
        {"name": f"SETTING_{i:03d}", "value": "x" * 40} for i in range(100)
    ]
    twin = copy.deepcopy(worker)
    twin["spec"]["containers"][0]["env"][-1]["value"] = "y"
    twin["spec"]["containers"][0]["env"].append({"name": "OTEL_SERVICE_NAME", "value": "mine"})
    first, again, other = admit(handler, worker), admit(handler, worker), admit(handler, twin)
    assert [len(key[2]) for key in handler._memo] == [16, 16]  # digests, not the 6 KB encodings
    assert again["ops"] == first["ops"]
    assert env_of(first)["OTEL_SERVICE_NAME"] == "demo"
    assert env_of(other)["OTEL_SERVICE_NAME"] == "mine"


def test_small_pods_are_their_own_key() -> None:
    handler = Handler(Source(locusttest("demo", otel={"enabled": True})), MutationSettings())
    admit(handler, operator_pod("demo", "worker"))
    (key,) = handler._memo
    assert 16 < len(key[2]) <= 4096


def test_pods_differing_only_in_init_containers_get_patches_of_their_own() -> None:
    """The exporter is appended to the pod's own init containers, or creates the list: one
    pod's patch would drop the other's init container, or not apply to it at all."""
    handler = Handler(Source(locusttest("demo")), MutationSettings())
    plain = operator_pod("demo", "master")
    with_init = copy.deepcopy(plain)
    with_init["spec"]["initContainers"] = [
        {"name": "fetch-data", "image": "busybox:1.36", "command": ["true"]}
    ]
    for pod, wanted in [
        (plain, ["locust-metrics-exporter"]),
        (with_init, ["fetch-data", "locust-metrics-exporter"]),
        (plain, ["locust-metrics-exporter"]),
    ]:
        response = admit(handler, pod)
        assert [c["name"] for c in response["pod"]["spec"]["initContainers"]] == wanted


def test_a_job_mismatch_is_logged_for_the_pods_of_that_job_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Pods that differ only in their owning Job share everything else the mutation reads."""
    handler = Handler(Source(locusttest("demo", otel={"enabled": True})), MutationSettings())
    ours = operator_pod("demo", "worker")
    other = copy.deepcopy(ours)
    other["metadata"]["ownerReferences"][0]["name"] = "hand-made"
    with caplog.at_level(logging.WARNING, logger="webhook.admission"):
        for uid, pod in [("other-1", other), ("ours", ours), ("other-2", other)]:
            admit(handler, pod, uid=uid)
    noted = [r.uid for r in caplog.records if "'hand-made'" in r.getMessage()]
    assert noted == ["other-1", "other-2"]
