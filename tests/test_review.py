"""The AdmissionReview envelope (SPEC sections 1 and 7), in-process through the Flask app: what
is refused with 400, what is answered without a patch, and the defaults of absent fields."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import Source
from fixtures import locusttest, operator_pod, review
from flask.testing import FlaskClient

from webhook.app import create_app
from webhook.config import MutationSettings
from webhook.handler import Handler


@pytest.fixture
def client() -> FlaskClient:
    source = Source(locusttest("demo", otel={"enabled": True}))
    return create_app(Handler(source, MutationSettings()), source, 64 * 1024).test_client()


def post(client: FlaskClient, document: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    answer = client.post("/mutate", data=json.dumps(document), content_type="application/json")
    return answer.status_code, answer.get_json()


@pytest.mark.parametrize("kind", [None, "AdmissionResponse", "Pod"])
def test_a_body_of_another_kind_is_refused_with_400(client: FlaskClient, kind: str | None) -> None:
    document = review(operator_pod("demo", "worker"))
    document["kind"] = kind
    status, answer = post(client, document)
    assert status == 400
    assert answer["error"].startswith("body is not an AdmissionReview (kind AdmissionReview,")


def test_an_empty_uid_is_refused_with_400(client: FlaskClient) -> None:
    """The answer must echo a uid the API server can match to its request."""
    document = review(operator_pod("demo", "worker"))
    document["request"]["uid"] = ""
    status, answer = post(client, document)
    assert status == 400
    assert answer["error"] == "request.uid is missing"


@pytest.mark.parametrize(
    ("field", "longest", "error"),
    [
        ("uid", 128, "request.uid is longer than 128 characters"),
        ("namespace", 63, "request.namespace is longer than a namespace name (63)"),
    ],
)
def test_a_uid_or_namespace_longer_than_any_real_one_is_refused_with_400(
    client: FlaskClient, field: str, longest: int, error: str
) -> None:
    """Every admission line carries both: a 4 MB uid made 4 MB log lines."""
    document = review(operator_pod("demo", "worker"))
    document["request"][field] = "a" * longest
    assert post(client, document)[0] == 200
    document["request"][field] = "a" * (longest + 1)
    assert post(client, document) == (400, {"error": error})


@pytest.mark.parametrize(
    "kind",
    [
        {"group": "example.com", "version": "v1", "kind": "Pod"},
        {"group": "", "version": "v2", "kind": "Pod"},
    ],
)
def test_a_pod_of_another_group_or_version_is_not_mutated(
    client: FlaskClient, kind: dict[str, str]
) -> None:
    document = review(operator_pod("demo", "worker"))
    document["request"]["kind"] = kind
    status, answer = post(client, document)
    assert status == 200
    assert answer["response"] == {"uid": document["request"]["uid"], "allowed": True}


def test_null_fields_are_read_as_absent(client: FlaskClient) -> None:
    """The pod's own namespace stands in for a null request.namespace."""
    pod = operator_pod("demo", "worker")
    pod["metadata"]["namespace"] = "default"
    document = review(pod)
    document["request"].update(namespace=None, subResource=None, dryRun=None)
    status, answer = post(client, document)
    assert status == 200
    assert answer["response"]["patchType"] == "JSONPatch"


@pytest.mark.parametrize("dry_run", ["true", 1, {"dryRun": True}])
def test_a_dry_run_that_is_not_a_boolean_is_refused_with_400(
    client: FlaskClient, dry_run: Any
) -> None:
    """The API server sends a boolean; what else arrives is not guessed at (nor logged)."""
    document = review(operator_pod("demo", "worker"))
    document["request"]["dryRun"] = dry_run
    status, answer = post(client, document)
    assert status == 400
    assert answer["error"] == "request.dryRun must be a bool"
