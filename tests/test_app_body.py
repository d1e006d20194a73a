"""How POST /mutate reads its body, at the WSGI level: the framings a server hands the app
that a well-behaved client over HTTPS cannot produce (the HTTPS cases are in test_http)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from conftest import Source
from fixtures import locusttest, operator_pod, review
from flask import Flask
from werkzeug.test import create_environ

from webhook.app import create_app
from webhook.config import MutationSettings
from webhook.handler import Handler

LIMIT = 64 * 1024


@pytest.fixture
def app() -> Flask:
    source = Source(locusttest("otel-test", otel={"enabled": True}))
    return create_app(Handler(source, MutationSettings()), source, LIMIT)


def call(app: Flask, body: bytes, **environ: Any) -> tuple[int, dict[str, Any]]:
    env = create_environ("/mutate", method="POST", content_type="application/json")
    env["wsgi.input"] = io.BytesIO(body)
    env.update(environ)
    status: list[str] = []
    chunks = app(env, lambda s, _h, _e=None: status.append(s))
    data = b"".join(chunks)
    return int(status[0].split()[0]), json.loads(data)


BODY = json.dumps(review(operator_pod("otel-test", "master"))).encode()


def test_a_body_with_its_length_is_answered(app: Flask) -> None:
    status, answer = call(app, BODY, CONTENT_LENGTH=str(len(BODY)))
    assert status == 200
    assert answer["response"]["patchType"] == "JSONPatch"


def test_a_body_shorter_than_its_length_is_refused(app: Flask) -> None:
    status, answer = call(app, BODY[:100], CONTENT_LENGTH=str(len(BODY)))
    assert status == 400
    assert answer["error"] == f"the body ended after 100 of its {len(BODY)} bytes"


def test_bytes_past_the_length_are_not_read(app: Flask) -> None:
    stream = io.BytesIO(BODY + b"GET /next HTTP/1.1\r\n")
    status, _ = call(app, b"", CONTENT_LENGTH=str(len(BODY)), **{"wsgi.input": stream})
    assert status == 200
    assert stream.read() == b"GET /next HTTP/1.1\r\n"


def test_a_terminated_body_without_length_is_read_up_to_the_limit(app: Flask) -> None:
    status, answer = call(app, BODY, **{"wsgi.input_terminated": True})
    assert status == 200, answer
    status, answer = call(app, b" " * (LIMIT + 1), **{"wsgi.input_terminated": True})
    assert status == 413
    assert answer["error"] == f"body is over the limit of {LIMIT} bytes"


def test_a_body_neither_sized_nor_terminated_is_not_read(app: Flask) -> None:
    stream = io.BytesIO(BODY)
    status, answer = call(app, b"", **{"wsgi.input": stream})
    assert status == 400
    assert answer["error"] == "empty body: expected an AdmissionReview"
    assert stream.tell() == 0


def test_a_content_type_with_parameters_is_json(app: Flask) -> None:
    status, _ = call(
        app, BODY, CONTENT_LENGTH=str(len(BODY)), CONTENT_TYPE="application/json; charset=utf-8"
    )
    assert status == 200
    status, answer = call(app, BODY, CONTENT_LENGTH=str(len(BODY)), CONTENT_TYPE="text/plain")
    assert status == 415
    assert answer["error"] == "Content-Type must be application/json"


def test_a_body_of_exactly_the_limit_is_read(app: Flask) -> None:
    padded = BODY + b" " * (LIMIT - len(BODY))
    status, answer = call(app, padded, CONTENT_LENGTH=str(LIMIT))
    assert status == 200, answer
    status, answer = call(app, padded + b" ", CONTENT_LENGTH=str(LIMIT + 1))
    assert status == 413
    assert answer["error"] == f"body of {LIMIT + 1} bytes is over the limit of {LIMIT} bytes"


class Stalled(io.RawIOBase):
    """A body stream whose read fails the way the server's does."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def read(self, size: int = -1) -> bytes:
        raise self.error


def test_a_body_that_stops_arriving_gets_408(app: Flask) -> None:
    stream = Stalled(TimeoutError("request not received within 5 s"))
    status, answer = call(app, b"", CONTENT_LENGTH=str(len(BODY)), **{"wsgi.input": stream})
    assert status == 408
    assert answer["error"] == "the request body did not arrive in time"


def test_a_body_the_server_cannot_unframe_gets_400(app: Flask) -> None:
    class InvalidChunkSize(Exception):  # gunicorn's own, not a ValueError
        pass

    stream = Stalled(InvalidChunkSize("zz"))
    status, answer = call(app, b"", **{"wsgi.input": stream, "wsgi.input_terminated": True})
    assert status == 400
    assert answer["error"] == "the request body could not be read"


def test_the_default_limit_takes_what_the_api_server_may_send() -> None:
    """The API server's own limit on a request body is 3 MiB: a review of that size is
    answered under the serving default."""
    from webhook.config import ServeSettings

    source = Source(locusttest("otel-test", otel={"enabled": True}))
    app = create_app(Handler(source, MutationSettings()), source, ServeSettings().max_body_bytes)
    pod = operator_pod("otel-test", "master")
    pod["metadata"]["annotations"] = {"padding": "x" * (3 * 1024 * 1024 - 4096)}
    body = json.dumps(review(pod)).encode()
    assert 3 * 1024 * 1024 - 4096 < len(body) <= 3 * 1024 * 1024
    status, answer = call(app, body, CONTENT_LENGTH=str(len(body)))
    assert status == 200
    assert answer["response"]["patchType"] == "JSONPatch"
