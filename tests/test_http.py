"""The HTTP contract (SPEC sections 1, 7, 8) over real TLS against `locust-webhook serve`."""

from __future__ import annotations

import base64
import contextlib
import copy
import http.client
import json
import os
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from conftest import validate_pod
from e2e_support import wait_until
from fixtures import locusttest, operator_pod, review
from server_process import Server, serve

from webhook.logs import FLUSH_SECONDS
from webhook.tls import REQUEST_READ_BUDGET

ENDPOINT = "http://otel-collector.monitoring:4317"
TESTS = [
    locusttest("otel-test", otel={"enabled": True, "endpoint": ENDPOINT}),
    locusttest("team-a.load-test", "perf", otel={"enabled": True, "endpoint": ENDPOINT}),
    locusttest("plain-test"),
    locusttest("must-have", annotations={"observability.locust.io/required": "true"}),
    locusttest("bad-endpoint", otel={"enabled": True, "endpoint": "otel:4317"}),
]


def write_locusttests(directory: Path, tests: list[dict[str, Any]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tests.yaml").write_text(yaml.safe_dump_all(tests))
    return directory


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("http")
    tests = write_locusttests(tmp / "locusttests", TESTS)
    with serve(
        tmp, "--locusttests", str(tests), "--workers", "2", "--max-body-bytes", str(512 * 1024)
    ) as running:
        yield running


@pytest.fixture
def conn(server: Server) -> Iterator[http.client.HTTPSConnection]:
    connection = http.client.HTTPSConnection(
        "localhost", server.port, context=server.ssl_context(), timeout=10
    )
    yield connection
    connection.close()


def post(
    conn: http.client.HTTPSConnection,
    body: bytes | str,
    content_type: str = "application/json",
    **headers: str,
) -> tuple[int, Any]:
    conn.request("POST", "/mutate", body=body, headers={"Content-Type": content_type, **headers})
    answer = conn.getresponse()
    data = answer.read()
    return answer.status, json.loads(data) if data else None


def admit(conn: http.client.HTTPSConnection, request: dict[str, Any]) -> dict[str, Any]:
    status, answer = post(conn, json.dumps(request))
    assert status == 200, answer
    assert answer["apiVersion"] == request["apiVersion"]
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == request["request"]["uid"]
    return dict(answer["response"])


def apply(response: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    result = jsonpatch.JsonPatch(patch).apply(copy.deepcopy(pod))
    validate_pod(result)
    return dict(result)


def test_otel_master_is_patched(conn: http.client.HTTPSConnection) -> None:
    pod = operator_pod("otel-test", "master")
    response = admit(conn, review(pod))
    assert response["allowed"] is True
    assert "warnings" not in response
    container = apply(response, pod)["spec"]["containers"][0]
    assert "--otel" in container["args"]
    assert {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": ENDPOINT} in container["env"]


def test_reinvocation_of_the_patched_pod_has_no_patch(conn: http.client.HTTPSConnection) -> None:
    pod = operator_pod("otel-test", "worker")
    patched = apply(admit(conn, review(pod)), pod)
    again = admit(conn, review(patched))
    assert again == {"uid": again["uid"], "allowed": True}


def test_name_with_dots_is_looked_up_in_the_pods_namespace(
    conn: http.client.HTTPSConnection,
) -> None:
    pod = operator_pod("team-a.load-test", "worker")
    assert "patch" in admit(conn, review(pod, namespace="perf"))
    elsewhere = admit(conn, review(pod, namespace="default"))
    assert "patch" not in elsewhere
    assert "not found" in elsewhere["warnings"][0]


def test_v1beta1_is_answered_in_v1beta1(conn: http.client.HTTPSConnection) -> None:
    pod = operator_pod("plain-test", "master")
    response = admit(conn, review(pod, api_version="admission.k8s.io/v1beta1"))
    assert apply(response, pod)["spec"]["initContainers"][0]["name"] == "locust-metrics-exporter"


def test_dry_run_is_handled_like_a_real_request(conn: http.client.HTTPSConnection) -> None:
    pod = operator_pod("otel-test", "master")
    real = admit(conn, review(pod, uid="same"))
    dry = admit(conn, review(pod, uid="same", dry_run=True))
    assert real == dry


@pytest.mark.parametrize("case", ["update", "no-label", "other-kind", "subresource"])
def test_requests_we_do_not_act_on_are_allowed_without_patch(
    conn: http.client.HTTPSConnection, case: str
) -> None:
    pod = operator_pod("otel-test", "master")
    request = review(pod)
    if case == "update":
        request["request"]["operation"] = "UPDATE"
    elif case == "no-label":
        del request["request"]["object"]["metadata"]["labels"]["performance-test-name"]
    elif case == "other-kind":
        request["request"]["kind"] = {"group": "batch", "version": "v1", "kind": "Job"}
    else:
        request["request"]["subResource"] = "ephemeralcontainers"
    assert admit(conn, request) == {"uid": request["request"]["uid"], "allowed": True}


def test_missing_locusttest_fails_open_with_a_warning(conn: http.client.HTTPSConnection) -> None:
    response = admit(conn, review(operator_pod("nobody", "master")))
    assert response["allowed"] is True
    assert "patch" not in response
    assert "LocustTest default/nobody: not found" in response["warnings"][0]


def test_unworkable_endpoint_is_warned_about(conn: http.client.HTTPSConnection) -> None:
    response = admit(conn, review(operator_pod("bad-endpoint", "worker")))
    assert "patch" in response
    assert "no scheme" in response["warnings"][0]


def test_malformed_pod_is_allowed_unchanged_with_a_warning(
    conn: http.client.HTTPSConnection,
) -> None:
    pod = operator_pod("otel-test", "master")
    pod["spec"]["containers"] = "not a list"
    response = admit(conn, review(pod))
    assert response["allowed"] is True and "patch" not in response
    assert "spec.containers" in response["warnings"][0]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"", 400, "empty body"),
        (b"{not json", 400, "not JSON"),
        (b"[1, 2]", 400, "not an AdmissionReview"),
        (b'{"kind": "Pod", "apiVersion": "v1"}', 400, "not an AdmissionReview"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}', 400, "no request"),
        (
            b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {}}',
            400,
            "uid",
        ),
        (
            b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": '
            b'{"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, '
            b'"operation": "CREATE", "object": 7}}',
            400,
            "request.object",
        ),
    ],
)
def test_bad_bodies_get_400(
    conn: http.client.HTTPSConnection, body: bytes, status: int, message: str
) -> None:
    got, answer = post(conn, body)
    assert got == status
    assert message in answer["error"]


def test_wrong_content_type_gets_415(conn: http.client.HTTPSConnection) -> None:
    got, answer = post(conn, json.dumps(review(operator_pod("otel-test", "master"))), "text/plain")
    assert got == 415
    assert "Content-Type must be application/json" in answer["error"]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS"])
def test_wrong_method_gets_405(conn: http.client.HTTPSConnection, method: str) -> None:
    conn.request(method, "/mutate")
    answer = conn.getresponse()
    assert answer.status == 405
    assert answer.getheader("Allow") == "POST"
    assert answer.getheader("Content-Type") == "application/json"
    assert json.loads(answer.read()) == {"error": f"method {method} is not allowed on /mutate"}


def test_unknown_path_gets_404_naming_the_admission_route(
    conn: http.client.HTTPSConnection,
) -> None:
    conn.request("POST", "/validate", body=b"{}", headers={"Content-Type": "application/json"})
    answer = conn.getresponse()
    assert answer.status == 404
    assert answer.getheader("Content-Type") == "application/json"
    assert json.loads(answer.read()) == {
        "error": "no route /validate; admission reviews go to POST /mutate"
    }


def test_refused_requests_are_counted_by_status(conn: http.client.HTTPSConnection) -> None:
    def counted() -> float:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        prefix = 'locust_webhook_bad_requests_total{status="415"} '
        return sum(float(x[len(prefix) :]) for x in text.splitlines() if x.startswith(prefix))

    before = counted()
    post(conn, b"{}", "text/plain")
    assert counted() == before + 1


def read_response(tls: ssl.SSLSocket) -> bytes:
    """One HTTP/1.1 response with a Content-Length, read off a raw TLS socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    while len(body) < length:
        body += tls.recv(65536)
    return head + b"\r\n\r\n" + body


def test_oversized_body_gets_413_before_it_is_sent(server: Server) -> None:
    """A Content-Length over the limit is refused at once (and the connection closed)."""
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    with server.ssl_context().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(
            b"POST /mutate HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: 600000\r\n\r\n{"
        )
        answer = read_response(tls)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert b"over the limit" in answer


def test_oversized_chunked_body_without_length_gets_413(server: Server) -> None:
    """Flask's own limit only reads Content-Length; a chunked body must be counted."""
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    with server.ssl_context().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(
            b"POST /mutate HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        # Just over the limit, in one write: the request is complete before the server answers.
        chunk = b"x" * 65536
        tls.sendall(
            b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(9)) + b"0\r\n\r\n"
        )
        answer = read_response(tls)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert b"over the limit" in answer


def test_small_chunked_body_is_admitted(server: Server) -> None:
    body = json.dumps(review(operator_pod("otel-test", "worker"))).encode()
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    with server.ssl_context().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(
            b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        half = len(body) // 2
        for part in (body[:half], body[half:]):
            tls.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        tls.sendall(b"0\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert b'"patchType":"JSONPatch"' in data


def test_connection_is_kept_alive_across_admissions(conn: http.client.HTTPSConnection) -> None:
    pod = operator_pod("otel-test", "worker")
    for _ in range(20):
        admit(conn, review(pod))
    first_socket = conn.sock
    admit(conn, review(pod))
    assert conn.sock is first_socket


def test_an_idle_connection_is_kept_past_the_first_requests_read_budget(
    conn: http.client.HTTPSConnection,
) -> None:
    """The API server reuses connections idle for up to ~90 s: neither gunicorn's default
    keep-alive (2 s) nor the first request's read budget may end them."""
    pod = operator_pod("otel-test", "worker")
    admit(conn, review(pod))
    first_socket = conn.sock
    time.sleep(REQUEST_READ_BUDGET + 1)  # the idle time is the behaviour under test
    admit(conn, review(pod))
    assert conn.sock is first_socket


def listening_sockets(pid: int, port: int) -> set[int]:
    """The inodes of the TCP sockets listening on `port` that process `pid` holds."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                listening.add(int(fields[9]))
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(fd)
            if target.startswith("socket:["):
                held.add(int(target[len("socket:[") : -1]))
    return listening & held


def test_each_worker_listens_on_a_socket_of_its_own(server: Server) -> None:
    """reuse_port: the kernel spreads new connections over the workers. On one shared socket
    long-lived connections piled onto one worker in about half of the runs (SPEC section 8)."""
    sockets = [listening_sockets(pid, server.port) for pid in server.workers(2)]
    assert len(sockets) == 2
    assert all(sockets)
    assert not sockets[0] & sockets[1]


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_below_1_2_is_refused_by_the_server(server: Server, version: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(server.ca_file))
    # Let this client really offer the old protocol: the refusal must come from the server.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion[version]
        context.maximum_version = ssl.TLSVersion[version]
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
        context.wrap_socket(raw, server_hostname="localhost")
    raw.close()


def test_tls_1_2_is_accepted(server: Server) -> None:
    context = ssl.create_default_context(cafile=str(server.ca_file))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() == "TLSv1.2"


def test_an_ipv6_address_is_served(tmp_path: Path) -> None:
    tests = write_locusttests(tmp_path / "locusttests", TESTS)
    args = ("--locusttests", str(tests), "--workers", "1", "--host", "::1")
    with serve(tmp_path, *args, ready=False) as server:

        def ready() -> bool:
            assert server.process.poll() is None, server.log()
            conn = http.client.HTTPSConnection(
                "::1", server.port, context=server.ssl_context(), timeout=2
            )
            try:
                conn.request("GET", "/readyz")
                return conn.getresponse().status == 200
            except OSError:
                return False
            finally:
                conn.close()

        wait_until(ready, timeout=30, what="/readyz on [::1]")
        assert f"serving HTTPS on ::1 port {server.port}" in server.log()


def test_health_readiness_and_metrics(conn: http.client.HTTPSConnection) -> None:
    admit(conn, review(operator_pod("otel-test", "master")))
    for path in ("/healthz", "/readyz"):
        conn.request("GET", path)
        answer = conn.getresponse()
        assert (answer.status, answer.read()) == (200, b"ok\n")
    conn.request("GET", "/metrics")
    answer = conn.getresponse()
    text = answer.read().decode()
    assert answer.status == 200
    assert 'locust_webhook_admissions_total{outcome="patched",reason="otel"}' in text
    assert "locust_webhook_locusttests_cached 5.0" in text
    assert "locust_webhook_certificate_expiry_timestamp_seconds 1." in text
    assert "locust_webhook_admission_duration_seconds_bucket" in text


def test_the_log_says_where_it_serves(server: Server) -> None:
    wanted = f"serving HTTPS on 127.0.0.1 port {server.port}: 2 workers of 16 threads"
    assert wanted in server.log()
    assert "Listening at" not in server.log()  # gunicorn's, without an address under reuse_port


def test_one_structured_log_line_per_admission(
    server: Server, conn: http.client.HTTPSConnection
) -> None:
    request = review(operator_pod("otel-test", "master"), uid="log-line-uid")
    admit(conn, request)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in server.log().splitlines() if "log-line-uid" in line]

    # Admission lines are written in batches, at most FLUSH_SECONDS after the answer.
    wait_until(lines, timeout=5, what="the admission's log line")
    time.sleep(3 * FLUSH_SECONDS)
    found = lines()
    assert len(found) == 1, found
    assert {k: found[0][k] for k in ("namespace", "pod", "locusttest", "role", "outcome")} == {
        "namespace": "default",
        "pod": "otel-test-master-",
        "locusttest": "otel-test",
        "role": "master",
        "outcome": "patched",
    }


@pytest.fixture(scope="module")
def closed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("closed")
    tests = write_locusttests(tmp / "locusttests", TESTS)
    with serve(
        tmp,
        "--locusttests",
        str(tests),
        "--workers",
        "1",
        env={"LOCUST_WEBHOOK_FAILURE_POLICY": "closed"},
    ) as running:
        yield running


def test_fail_closed_denies_when_the_locusttest_is_missing(closed_server: Server) -> None:
    conn = http.client.HTTPSConnection(
        "localhost", closed_server.port, context=closed_server.ssl_context(), timeout=10
    )
    response = admit(conn, review(operator_pod("nobody", "master")))
    conn.close()
    assert response["allowed"] is False
    assert "LocustTest default/nobody: not found" in response["status"]["message"]


def test_required_locusttest_is_denied_when_it_cannot_be_injected(
    conn: http.client.HTTPSConnection,
) -> None:
    pod = operator_pod(
        "must-have", "master", annotations={"observability.locust.io/container": "missing"}
    )
    response = admit(conn, review(pod))
    assert response["allowed"] is False
    assert "no such container" in response["status"]["message"]
