"""Flask factory: routes, size and content-type checks, body reading. Nothing else."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Flask, Response, request
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.wsgi import get_content_length

from . import metrics
from .handler import Handler
from .lookup import LocustTestSource
from .review import BadReview

log = logging.getLogger(__name__)
JSON = "application/json"


def _error(status: int, message: str) -> Response:
    metrics.BAD_REQUESTS.labels(str(status)).inc()
    log.info("refused", extra={"status": status, "path": request.path, "error": message})
    return Response(orjson.dumps({"error": message}), status=status, mimetype=JSON)


def _read_body(environ: dict[str, Any], limit: int) -> bytes | Response:
    """The request body, or the error response when it is too large or unreadable. Chunked
    bodies carry no Content-Length, so the limit is enforced while reading. Read from the
    server's stream itself: werkzeug's wrappers around it cost more than the read."""
    length = get_content_length(environ)
    if length is not None and length > limit:
        return _error(413, f"body of {length} bytes is over the limit of {limit} bytes")
    if length is None and not environ.get("wsgi.input_terminated"):
        return b""  # werkzeug's rule: a stream the server does not end is not read
    try:
        body: bytes = environ["wsgi.input"].read(limit + 1 if length is None else length)
    except TimeoutError:
        # The client stopped sending within the read budget (tls.DeadlineSSLSocket); the
        # connection is closed after this answer.
        return _error(408, "the request body did not arrive in time")
    except Exception as exc:  # the server's body reader raises its own types for bad framing
        log.info("unreadable request body: %s", exc)
        return _error(400, "the request body could not be read")
    if length is not None and len(body) < length:
        return _error(400, f"the body ended after {len(body)} of its {length} bytes")
    if len(body) > limit:
        return _error(413, f"body is over the limit of {limit} bytes")
    return body


def create_app(handler: Handler, source: LocustTestSource, max_body_bytes: int) -> Flask:
    """The WSGI app serving /mutate, /healthz, /readyz and /metrics."""
    app = Flask("webhook")
    # Flask would answer OPTIONS on every route itself (200, HTML): 405 like any other method.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False

    @app.route("/mutate", methods=["POST"])
    def mutate() -> Response:
        environ = request.environ
        # What the API server sends, compared as it is; anything else is parsed.
        if environ.get("CONTENT_TYPE") != JSON and request.mimetype != JSON:
            return _error(415, f"Content-Type must be {JSON}")
        body = _read_body(environ, max_body_bytes)
        if isinstance(body, Response):
            return body
        try:
            answer = handler.handle(body)
        except BadReview as exc:
            return _error(400, str(exc))
        return Response(answer, mimetype=JSON)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", mimetype="text/plain")

    @app.get("/readyz")
    def readyz() -> Response:
        if source.ready():
            return Response("ok\n", mimetype="text/plain")
        return Response("LocustTest cache not synced yet\n", status=503, mimetype="text/plain")

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)

    @app.errorhandler(405)
    def method_not_allowed(exc: MethodNotAllowed) -> Response:
        response = _error(405, f"method {request.method} is not allowed on {request.path}")
        response.headers["Allow"] = ", ".join(exc.valid_methods or ())
        return response

    @app.errorhandler(404)
    def not_found(_: Exception) -> Response:
        return _error(404, f"no route {request.path}; admission reviews go to POST /mutate")

    return app
