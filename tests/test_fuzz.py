"""Hostile input, fuzzed with hypothesis (issue 5, item 4): arbitrary JSON, truncated bodies,
deep nesting, huge strings, wrong types in every field of the review and of the pod, label and
annotation keys with `/` and `~`.

Invariants: never a 5xx for the client's error, never a hang, never a crashed worker, and every
patch applies strictly to the pod as sent; when that pod was valid, so is the patched one.
Most examples run in-process through the Flask app; a smaller set goes over real HTTPS.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
from collections.abc import Iterator
from typing import Any

import jsonpatch
import pytest
import yaml
from conftest import Source, validate_pod
from fixtures import locusttest, operator_pod, review
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes_validate.utils import ValidationError
from reliability_summary import Recorder, reliability
from server_process import Server, serve

from webhook.app import create_app
from webhook.config import MutationSettings
from webhook.handler import Handler
from webhook.review import BadReview

__all__ = ["reliability"]  # the fixture, imported for the tests of this module

LIMIT = 256 * 1024
ENDPOINT = "http://otel-collector.monitoring:4317"
TESTS = [
    locusttest("otel", otel={"enabled": True, "endpoint": ENDPOINT, "extraEnvVars": {"A": "b"}}),
    locusttest("plain"),
    locusttest("shell", otel={"enabled": True, "endpoint": ENDPOINT, "protocol": "http/protobuf"}),
    locusttest("must", annotations={"observability.locust.io/required": "true"}),
]
NAMES = [t["metadata"]["name"] for t in TESTS] + ["missing"]
FUZZ = settings(
    max_examples=250,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def fixed_source() -> Source:
    """The LocustTests above."""
    return Source(*TESTS)


@pytest.fixture(scope="module")
def client() -> FlaskClient:
    source = fixed_source()
    app = create_app(Handler(source, MutationSettings()), source, LIMIT)
    return app.test_client()


# -- strategies ------------------------------------------------------------------------------

KEY_CHARS = st.sampled_from([*"abz09-._/~", "~0", "~1", "/~", "é"])
keys = st.lists(KEY_CHARS, min_size=1, max_size=12).map("".join)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def deep(depth: int) -> Any:
    value: Any = "bottom"
    for level in range(depth):
        value = [value] if level % 2 else {"x": value}
    return value


hostile_values = (
    json_values
    | st.integers(1, 600).map(deep)
    | st.integers(1, 200_000).map(lambda n: "x" * n)
    | st.sampled_from([[], {}, "", 0, -1, 1e308, True, None, "\x00", "💥" * 50])
)

# Paths (as lists of keys or indices) into an operator pod: each gets a wrong-typed value.
POD_PATHS = [
    [],
    ["metadata"],
    ["metadata", "labels"],
    ["metadata", "labels", "performance-test-name"],
    ["metadata", "labels", "performance-test-pod-name"],
    ["metadata", "annotations"],
    ["metadata", "generateName"],
    ["metadata", "ownerReferences"],
    ["metadata", "ownerReferences", 0, "name"],
    ["spec"],
    ["spec", "containers"],
    ["spec", "containers", 0],
    ["spec", "containers", 0, "name"],
    ["spec", "containers", 0, "image"],
    ["spec", "containers", 0, "args"],
    ["spec", "containers", 0, "args", 0],
    ["spec", "containers", 0, "command"],
    ["spec", "containers", 0, "env"],
    ["spec", "containers", 0, "ports"],
    ["spec", "initContainers"],
    ["spec", "volumes"],
]
REVIEW_FIELDS = [
    "apiVersion",
    "kind",
    "request",
    "request.uid",
    "request.kind",
    "request.kind.kind",
    "request.kind.group",
    "request.operation",
    "request.namespace",
    "request.subResource",
    "request.dryRun",
    "request.object",
    "request.options",
]


def set_path(document: Any, path: list[Any], value: Any) -> Any:
    if not path:
        return value
    node = document
    for step in path[:-1]:
        inside_list = isinstance(node, list) and isinstance(step, int) and step < len(node)
        if (isinstance(node, dict) and step in node) or inside_list:
            node = node[step]
        else:
            return document
    if isinstance(node, dict) or (isinstance(node, list) and path[-1] < len(node)):
        node[path[-1]] = value
    return document


@st.composite
def pods(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """An operator pod, varied; the flag says whether it is still meant to be a valid Pod."""
    name = draw(st.sampled_from(NAMES[:1] * 3 + NAMES))
    role = draw(st.sampled_from(["master", "worker"]))
    annotations = draw(st.dictionaries(keys, st.text(max_size=20), max_size=4))
    if draw(st.integers(0, 3)) == 0:
        annotations["observability.locust.io/inject"] = draw(st.sampled_from(["false", "true"]))
    env = draw(
        st.none()
        | st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "X"]),
                    "value": st.text(max_size=30),
                }
            ),
            max_size=3,
            unique_by=lambda e: e["name"],
        )
    )
    pod = operator_pod(
        name,
        role,
        annotations=annotations or None,
        env=env,
        with_exporter=draw(st.booleans()),
        extra_args=draw(st.lists(st.sampled_from(["--otel", "--web-port=9999", "-u", "5"]))),
    )
    labels = pod["metadata"]["labels"]
    labels.update(draw(st.dictionaries(keys, st.text(max_size=10), max_size=3)))
    if draw(st.booleans()):
        container = pod["spec"]["containers"][0]
        container["command"] = ["sh", "-c"]
        container["args"] = ["locust " + " ".join(container["args"])]
    valid = True
    if draw(st.integers(0, 2)) == 0:
        path = draw(st.sampled_from(POD_PATHS))
        pod = set_path(pod, list(path), draw(hostile_values))
        valid = False
    return pod, valid


@st.composite
def reviews(draw: st.DrawFn) -> tuple[dict[str, Any], Any, bool]:
    pod, valid = draw(pods())
    document = review(pod, draw(st.sampled_from(["default", "other", ""])))
    document["apiVersion"] = draw(
        st.sampled_from(["admission.k8s.io/v1", "admission.k8s.io/v1beta1"])
    )
    if draw(st.integers(0, 4)) == 0:
        field = draw(st.sampled_from(REVIEW_FIELDS)).split(".")
        document = set_path(document, field, draw(hostile_values))
        valid = False
    request = document.get("request") if isinstance(document, dict) else None
    sent = request.get("object") if isinstance(request, dict) else None
    return document, sent, valid


# -- invariants ------------------------------------------------------------------------------


def check_answer(status: int, data: bytes, document: Any, pod: Any, pod_valid: bool) -> None:
    """The invariants for one answer to `document`."""
    assert status < 500, data[:300]
    assert status in (200, 400, 413), (status, data[:300])
    answer = json.loads(data)
    if status != 200:
        assert answer["error"]
        return
    response = answer["response"]
    assert response["uid"] == document["request"]["uid"]
    assert answer["apiVersion"] == document["apiVersion"]
    if "patch" not in response:
        return
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    # Strict: every `remove`/`replace`/`test` target must exist in the pod as sent.
    patched = jsonpatch.JsonPatch(patch).apply(copy.deepcopy(pod))
    if pod_valid:
        validate_pod(patched)


def is_valid_pod(pod: Any) -> bool:
    try:
        validate_pod(pod)
    except ValidationError:
        return False
    return True


# -- in-process ------------------------------------------------------------------------------


def post(client: FlaskClient, body: bytes) -> tuple[int, bytes]:
    answer = client.post("/mutate", data=body, content_type="application/json")
    return answer.status_code, answer.get_data()


@FUZZ
@given(case=reviews())
def test_fuzzed_reviews_get_a_sound_answer(
    client: FlaskClient, reliability: Recorder, case: tuple[dict[str, Any], Any, bool]
) -> None:
    document, pod, valid = case
    status, data = post(client, json.dumps(document).encode())
    reliability.add(1, int(status >= 500))
    # The mutation may only be judged against the schema when the pod as sent passed it.
    check_answer(status, data, document, pod, valid and is_valid_pod(pod))


@FUZZ
@given(value=hostile_values | st.binary(max_size=2048).map(lambda b: b.decode("latin-1")))
def test_arbitrary_json_is_refused_with_400(
    client: FlaskClient, reliability: Recorder, value: Any
) -> None:
    status, data = post(client, json.dumps(value).encode())
    reliability.add(1, int(status >= 500))
    assert status in (400, 413), data[:200]


@FUZZ
@given(data=st.data())
def test_truncated_and_corrupted_bodies_are_refused_with_400(
    client: FlaskClient, reliability: Recorder, data: st.DataObject
) -> None:
    body = json.dumps(review(operator_pod("otel", "master"))).encode()
    cut = data.draw(st.integers(0, len(body) - 1))
    junk = data.draw(st.binary(max_size=8))
    status, answer = post(client, body[:cut] + junk)
    reliability.add(1, int(status >= 500))
    assert status == 400 or (status == 200 and b'"uid"' in answer), answer[:200]


@settings(max_examples=30, deadline=5000, suppress_health_check=list(HealthCheck))
@given(depth=st.integers(1, 100_000), size=st.integers(LIMIT - 64, LIMIT + 4096))
def test_deep_nesting_and_bodies_near_the_limit(
    client: FlaskClient, reliability: Recorder, depth: int, size: int
) -> None:
    status, _ = post(client, b"[" * depth + b"]" * depth)
    assert status in (400, 413)
    padded = review(operator_pod("otel", "worker"))
    padded["request"]["object"]["metadata"]["annotations"] = {"pad": ""}
    raw = json.dumps(padded).encode()
    padded["request"]["object"]["metadata"]["annotations"]["pad"] = "x" * max(0, size - len(raw))
    body = json.dumps(padded).encode()
    status, data = post(client, body)
    reliability.add(2, int(status >= 500))
    assert status == (413 if len(body) > LIMIT else 200), data[:200]


# -- over real HTTPS -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz")
    directory = tmp / "locusttests"
    directory.mkdir()
    (directory / "tests.yaml").write_text(yaml.safe_dump_all(TESTS))
    with serve(
        tmp, "--workers", "2", "--locusttests", str(directory), "--max-body-bytes", str(LIMIT)
    ) as running:
        yield running


@pytest.fixture(scope="module")
def workers(server: Server) -> set[int]:
    return server.workers(2)


@settings(max_examples=60, deadline=10_000, suppress_health_check=list(HealthCheck))
@given(case=reviews(), truncate=st.booleans())
def test_fuzzed_reviews_over_https(
    server: Server,
    workers: set[int],
    reliability: Recorder,
    case: tuple[dict[str, Any], Any, bool],
    truncate: bool,
) -> None:
    document, pod, valid = case
    body = json.dumps(document).encode()
    if truncate:
        body = body[: len(body) // 2]
    conn = http.client.HTTPSConnection(
        "localhost", server.port, context=server.ssl_context(), timeout=10
    )
    try:
        conn.request("POST", "/mutate", body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        status, data = answer.status, answer.read()
    finally:
        conn.close()
    reliability.add(1, int(status >= 500))
    if truncate:
        assert status == 400, data[:200]
    else:
        check_answer(status, data, document, pod, valid and is_valid_pod(pod))
    assert server.workers(2, timeout=0) == workers


# -- the memo of identical pods --------------------------------------------------------------


@pytest.fixture(scope="module")
def remembering() -> Handler:
    """One handler for all examples: its memo fills up with the pods hypothesis draws."""
    return Handler(fixed_source(), MutationSettings())


def answer_of(handler: Handler, document: Any) -> bytes | str:
    try:
        return handler.handle(json.dumps(document).encode())
    except BadReview as exc:
        return f"400: {exc}"


@FUZZ
@given(case=reviews(), node=st.text(max_size=10), time=st.text(max_size=10))
def test_remembered_answers_equal_fresh_ones(
    remembering: Handler, case: tuple[dict[str, Any], Any, bool], node: str, time: str
) -> None:
    """The memo answers exactly as mutating anew would, for the pod asked twice and for a pod
    that differs from it only where the mutation never looks (name, managedFields, nodeName)."""
    document, _, _ = case
    fresh = answer_of(Handler(fixed_source(), MutationSettings()), document)
    assert answer_of(remembering, document) == fresh
    assert answer_of(remembering, document) == fresh
    twin = copy.deepcopy(document)
    request = twin.get("request") if isinstance(twin, dict) else None
    pod = request.get("object") if isinstance(request, dict) else None
    if isinstance(pod, dict) and isinstance(pod.get("metadata"), dict):
        pod["metadata"]["name"] = f"demo-worker-{node}"
        pod["metadata"]["managedFields"] = [{"manager": "test", "time": time}]
        if isinstance(pod.get("spec"), dict):
            pod["spec"]["nodeName"] = node
    assert answer_of(remembering, twin) == answer_of(
        Handler(fixed_source(), MutationSettings()), twin
    )
