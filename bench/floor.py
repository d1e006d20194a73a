"""The floor: the webhook's own server stack with a trivial handler.

`WebhookServer` unchanged (gunicorn gthread, reuse_port, keep-alive, the cached TLS context,
the same workers and threads), except that `load()` returns a Flask app whose POST /mutate
parses the review with orjson and answers `allowed` for its uid. What the webhook costs above
this is its own work.

    python bench/floor.py --cert-file tls.crt --key-file tls.key --port 9443
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def floor_app() -> Any:
    import orjson
    from flask import Flask, Response, request

    app = Flask("floor")

    @app.route("/mutate", methods=["POST"])
    def mutate() -> Response:
        review = orjson.loads(request.get_data(cache=False))
        answer = {
            "apiVersion": review["apiVersion"],
            "kind": "AdmissionReview",
            "response": {"uid": review["request"]["uid"], "allowed": True},
        }
        return Response(orjson.dumps(answer), mimetype="application/json")

    @app.get("/readyz")
    def readyz() -> Response:
        return Response("ok\n", mimetype="text/plain")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert-file", required=True)
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9443)
    parser.add_argument("--workers", type=int, default=None, help="default: serve's default")
    parser.add_argument("--threads", type=int, default=None, help="default: serve's default")
    args = parser.parse_args()
    # WebhookServer's child_exit marks dead workers in the Prometheus multiprocess directory.
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="bench-floor-"))

    from webhook.config import ServeSettings
    from webhook.server import WebhookServer

    defaults = ServeSettings()
    settings = ServeSettings(
        cert_file=args.cert_file,
        key_file=args.key_file,
        host=args.host,
        port=args.port,
        workers=args.workers or defaults.workers,
        threads=args.threads or defaults.threads,
    )

    class FloorServer(WebhookServer):  # type: ignore[misc]
        def load(self) -> Any:
            return floor_app()

    FloorServer(settings).run()


if __name__ == "__main__":
    main()
