"""A small HTTPS server speaking the Kubernetes REST API for Secrets and
MutatingWebhookConfigurations, so the official client can be tested against real HTTP.

It keeps objects in memory, assigns resourceVersions, answers a missing object with a 404
Status, a stale PUT with a 409 Conflict, and applies JSON and merge patches. Every request is
recorded so a test can assert that an idempotent run wrote nothing.
"""

from __future__ import annotations

import base64
import copy
import datetime
import ipaddress
import json
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonpatch
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TOKEN = "test-token"
SECRETS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/secrets(?:/(?P<name>[^/]+))?$")
WEBHOOK_CONFIGS = re.compile(
    r"^/apis/admissionregistration\.k8s\.io/v1/mutatingwebhookconfigurations(?:/(?P<name>[^/]+))?$"
)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    content_type: str
    body: Any


@dataclass
class FakeCluster:
    """The stored objects, keyed by (resource, namespace, name), and the requests seen."""

    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    version: int = 0
    # Called (lock held) before a write is answered: lets a test play a concurrent writer.
    before_write: Callable[[Request], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, resource: str, namespace: str, obj: dict[str, Any]) -> None:
        """Store an object as if it had been created (tests use it to set the scene)."""
        with self.lock:
            self.store(resource, namespace, copy.deepcopy(obj))

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A copy of a stored object."""
        with self.lock:
            found = self.objects.get((resource, namespace, name))
            return copy.deepcopy(found)

    @property
    def writes(self) -> list[Request]:
        """Every request that was not a read."""
        return [r for r in self.requests if r.method != "GET"]

    def store(self, resource: str, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Save `obj` with a new resourceVersion; the caller holds the lock."""
        self.version += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.version)
        if namespace:
            obj["metadata"]["namespace"] = namespace
        self.objects[(resource, namespace, obj["metadata"]["name"])] = obj
        return obj


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _check(resource: str, obj: dict[str, Any]) -> str | None:
    """The validation the real API server would do on the fields the tests exercise."""
    try:
        if resource == "secrets":
            for value in (obj.get("data") or {}).values():
                base64.b64decode(value, validate=True)
        else:
            for webhook in obj.get("webhooks") or []:
                bundle = (webhook.get("clientConfig") or {}).get("caBundle")
                if bundle is not None:
                    base64.b64decode(bundle, validate=True)
    except ValueError as exc:
        return f"invalid base64: {exc}"
    return None


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the recorded requests are what tests look at."""

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        content_type = (self.headers.get("Content-Type") or "").split(";")[0]
        path = self.path.split("?")[0]
        cluster = self.server.cluster
        cluster.requests.append(Request(self.command, path, content_type, body))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._send(401, _status(401, "Unauthorized", "Unauthorized"))
            return
        if match := SECRETS.match(path):
            resource, namespace, name = "secrets", match["ns"], match["name"]
        elif match := WEBHOOK_CONFIGS.match(path):
            resource, namespace, name = "mutatingwebhookconfigurations", "", match["name"]
        else:
            self._send(404, _status(404, "NotFound", f"no route {path}"))
            return
        with cluster.lock:
            if self.command != "GET" and cluster.before_write is not None:
                cluster.before_write(cluster.requests[-1])
            code, answer = self._apply(cluster, resource, namespace, name, content_type, body)
        self._send(code, answer)

    def _apply(
        self,
        cluster: FakeCluster,
        resource: str,
        namespace: str,
        name: str | None,
        content_type: str,
        body: Any,
    ) -> tuple[int, dict[str, Any]]:
        if name is None:
            if self.command != "POST":
                return 405, _status(405, "MethodNotAllowed", "only POST on a collection")
            name = body["metadata"]["name"]
            if (resource, namespace, name) in cluster.objects:
                return 409, _status(409, "AlreadyExists", f'{resource} "{name}" already exists')
            if problem := _check(resource, body):
                return 422, _status(422, "Invalid", problem)
            return 201, cluster.store(resource, namespace, copy.deepcopy(body))
        current = cluster.objects.get((resource, namespace, name))
        if current is None:
            return 404, _status(404, "NotFound", f'{resource} "{name}" not found')
        if self.command == "GET":
            return 200, copy.deepcopy(current)
        if self.command == "PUT":
            sent = (body.get("metadata") or {}).get("resourceVersion")
            if sent != current["metadata"]["resourceVersion"]:
                message = "the object has been modified; please apply your changes to the latest"
                return 409, _status(409, "Conflict", message)
            updated = copy.deepcopy(body)
        elif self.command == "PATCH" and content_type == "application/json-patch+json":
            try:
                updated = jsonpatch.apply_patch(current, body)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return 422, _status(422, "Invalid", str(exc))
        elif self.command == "PATCH" and content_type == "application/merge-patch+json":
            updated = _merge_patch(current, body)
        else:
            return 415, _status(415, "UnsupportedMediaType", f"{self.command} {content_type}")
        if problem := _check(resource, updated):
            return 422, _status(422, "Invalid", problem)
        return 200, cluster.store(resource, namespace, updated)

    do_GET = do_POST = do_PUT = do_PATCH = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cluster: FakeCluster) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.cluster = cluster


def _self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kube-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@contextmanager
def serve(directory: Path) -> Iterator[tuple[FakeCluster, Path]]:
    """Run the server; yields the fake cluster and a kubeconfig pointing at it."""
    cert_pem, key_pem = _self_signed()
    (directory / "apiserver.crt").write_bytes(cert_pem)
    (directory / "apiserver.key").write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "apiserver.crt", directory / "apiserver.key")
    cluster = FakeCluster()
    server = _Server(cluster)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = directory / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "fake",
                        "cluster": {
                            "server": f"https://127.0.0.1:{server.server_address[1]}",
                            "certificate-authority-data": base64.b64encode(cert_pem).decode(),
                        },
                    }
                ],
                "users": [{"name": "fake", "user": {"token": TOKEN}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "current-context": "fake",
            }
        )
    )
    try:
        yield cluster, kubeconfig
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
