"""A local HTTPS server that speaks the Kubernetes list/watch protocol for locusttests.locust.io.

Real HTTP over TLS with a bearer token, `Status` errors, paged lists, chunked watch streams with
bookmarks and 410 Expired, plus fault knobs (latency, lag, cuts, failures, RBAC, garbage, held
answers) for tests.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import ipaddress
import json
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

GROUP = "locust.io"
ROUTE = re.compile(
    r"/apis/locust\.io/(?P<version>[^/]+)"
    r"(?:/namespaces/(?P<namespace>[^/]+))?/locusttests(?:/(?P<name>[^/]+))?"
)
REASONS = {
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "AlreadyExists",
    410: "Expired",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
TRUE = ("1", "t", "T", "true", "TRUE", "True")  # Go's strconv.ParseBool, as the API server uses


def status(code: int, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `Status` object as the API server sends it with an error."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": REASONS.get(code, "Unknown"),
        "code": code,
    }
    if details:
        body["details"] = details
    return body


@dataclass(frozen=True)
class Request:
    """One request as the server received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in TRUE


@dataclass(frozen=True)
class _Event:
    resource_version: int
    at: float
    type: str
    obj: dict[str, Any]


def _tls_material() -> tuple[bytes, bytes, bytes]:
    """A CA and a serving certificate for 127.0.0.1/localhost: (ca pem, cert pem, key pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kube-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pem = serialization.Encoding.PEM
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, like the real API server
    server: _Server

    def do_GET(self) -> None:
        self.server.api.handle(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read `FakeKubeAPI.requests` instead


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads: stop() leaves nothing behind

    def __init__(self, port: int, api: FakeKubeAPI) -> None:
        self.api = api
        super().__init__(("127.0.0.1", port), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS handshake here, in the connection's thread, so a slow client cannot block accept.
        request.settimeout(10)
        tls = self.api.context.wrap_socket(request, server_side=True)
        tls.settimeout(None)
        try:
            if self.api.track(tls):
                self.RequestHandlerClass(tls, client_address, self)
        finally:
            self.api.untrack(tls)
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that vanish mid-request (cut watches, timeouts) are expected here.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class FakeKubeAPI:
    """The `locusttests.locust.io` part of a Kubernetes API server, over HTTPS on 127.0.0.1."""

    def __init__(
        self,
        token: str = "test-token",
        versions: tuple[str, ...] = ("v1", "v2"),
        bookmark_interval: float = 0.2,
    ) -> None:
        self.token = token
        self.versions = versions
        self.bookmark_interval = bookmark_interval
        self.latency = 0.0  # seconds added before every response
        self.lag = 0.0  # seconds before an event is delivered on watches
        self.forbid = False  # 403 for everything, like a service account without RBAC
        self.forbid_namespaces: frozenset[str] = frozenset()  # 403 in these namespaces only
        self.garbage = False  # 200 with a body that is not JSON, like a proxy's error page
        self.silent = False  # open watches send nothing and never end, like a dead peer
        self.end_watches = False  # watches end at once, empty, like a draining server
        self.requests: list[Request] = []
        self._cond = threading.Condition()
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._history: list[_Event] = []
        self._resource_version = 1000
        self._compacted = 0  # watches from an older resourceVersion get 410 Expired
        self._cut = 0  # bumped by cut_watches(); open streams notice and close
        self._failures = 0
        self._failure_code = 500
        self._holding = False  # GETs read their object, then wait for release_gets()
        self._held = 0
        self._stopping = threading.Event()
        self._connections: set[ssl.SSLSocket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        ca_pem, cert_pem, key_pem = _tls_material()
        self.ca_pem = ca_pem
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tls.crt").write_bytes(cert_pem)
            (Path(tmp) / "tls.key").write_bytes(key_pem)
            self.context.load_cert_chain(Path(tmp) / "tls.crt", Path(tmp) / "tls.key")

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._port}"

    def start(self) -> FakeKubeAPI:
        """Serve (again, on the same port after the first start)."""
        self._stopping.clear()
        self._server = _Server(self._port, self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every connection, open watches included."""
        if self._server is None:
            return
        with self._cond:
            self._stopping.set()
            self._cond.notify_all()
        self._server.shutdown()
        with self._cond:
            for conn in self._connections:
                _shutdown(conn)
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = None

    def restart(self) -> None:
        """Stop and start on the same port; the stored objects survive."""
        self.stop()
        self.start()

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: str | Path) -> Path:
        """A kubeconfig for this server (CA data and bearer token) that kubernetes.config loads."""
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path = Path(path)
        path.write_text(json.dumps(kubeconfig))  # JSON is YAML
        return path

    def track(self, conn: ssl.SSLSocket) -> bool:
        """Remember an open connection; False when the server is stopping."""
        with self._cond:
            if self._stopping.is_set():
                return False
            self._connections.add(conn)
            return True

    def untrack(self, conn: ssl.SSLSocket) -> None:
        """Forget a closed connection."""
        with self._cond:
            self._connections.discard(conn)

    # -- store ---------------------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        """The latest resourceVersion of the store."""
        with self._cond:
            return str(self._resource_version)

    def _record(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        self._resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self._resource_version)
        self._history.append(_Event(self._resource_version, time.monotonic(), kind, obj))
        self._cond.notify_all()
        return copy.deepcopy(obj)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store a new object (namespace `default` when it has none); returns it as stored."""
        obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        metadata.setdefault("namespace", "default")
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("generation", 1)
        metadata.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        key = (metadata["namespace"], metadata["name"])
        with self._cond:
            if key in self._objects:
                raise KeyError(f"{key} already exists")
            self._objects[key] = obj
            return self._record("ADDED", obj)

    def update(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replace an existing object; returns it as stored."""
        obj = copy.deepcopy(obj)
        metadata = obj["metadata"]
        metadata.setdefault("namespace", "default")
        key = (metadata["namespace"], metadata["name"])
        with self._cond:
            old = self._objects[key]["metadata"]
            for field in ("uid", "creationTimestamp"):
                metadata[field] = old[field]
            metadata["generation"] = old["generation"] + 1
            self._objects[key] = obj
            return self._record("MODIFIED", obj)

    def delete(self, namespace: str, name: str) -> None:
        """Remove an object."""
        with self._cond:
            obj = copy.deepcopy(self._objects.pop((namespace, name)))
            self._record("DELETED", obj)

    # -- fault knobs ---------------------------------------------------------------------------

    def compact(self) -> None:
        """Forget the history: watches from an older resourceVersion now get 410 Expired."""
        with self._cond:
            self._compacted = self._resource_version
            self._history.clear()

    def cut_watches(self) -> None:
        """Close every open watch stream abruptly, without the final chunk."""
        with self._cond:
            self._cut += 1
            self._cond.notify_all()

    def fail_next(self, n: int, code: int = 500) -> None:
        """Answer the next `n` requests with `code` (0 clears)."""
        with self._cond:
            self._failures, self._failure_code = n, code

    def hold_gets(self) -> None:
        """From now on a GET reads its object at once but answers only after release_gets()."""
        with self._cond:
            self._holding = True

    def release_gets(self) -> None:
        """Let the held GETs answer (with the objects as they read them), and hold no more."""
        with self._cond:
            self._holding = False
            self._cond.notify_all()

    def held_gets(self) -> int:
        """How many GETs have read their object and wait for release_gets()."""
        with self._cond:
            return self._held

    def watches(self) -> list[Request]:
        """The watch requests received so far."""
        with self._cond:
            return [r for r in self.requests if r.watch]

    def lists(self) -> list[Request]:
        """The list (not watch, not get) requests received so far."""
        with self._cond:
            return [
                r
                for r in self.requests
                if not r.watch and (m := ROUTE.fullmatch(r.path)) and not m["name"]
            ]

    # -- HTTP ----------------------------------------------------------------------------------

    def handle(self, h: _Handler) -> None:
        """Answer one request."""
        url = urlsplit(h.path)
        query = dict(parse_qsl(url.query))
        with self._cond:
            headers = {k.lower(): v for k, v in h.headers.items()}
            self.requests.append(Request(h.command, url.path, query, headers))
            # A watch received before cut_watches() is one it cuts, however late it streams.
            cut = self._cut
            failure = self._failure_code if self._failures > 0 else 0
            self._failures = max(0, self._failures - 1)
        if self.latency and self._stopping.wait(self.latency):
            h.close_connection = True
            return
        if failure:
            return _send(h, failure, status(failure, f"injected failure {failure}"))
        if self.garbage:
            return _send_data(h, 200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
        # The scheme is case-insensitive (RFC 9110); the in-cluster client sends `bearer`.
        scheme, _, token = (h.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or token != self.token:
            return _send(h, 401, status(401, "Unauthorized"))
        route = ROUTE.fullmatch(url.path)
        if route is None or route["version"] not in self.versions:
            return _send(h, 404, status(404, "the server could not find the requested resource"))
        version, namespace, name = route["version"], route["namespace"], route["name"]
        if self.forbid or namespace in self.forbid_namespaces:
            verb = "get" if name else "watch" if query.get("watch") in TRUE else "list"
            scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            message = (
                f'locusttests.locust.io is forbidden: User "system:serviceaccount:webhook:webhook" '
                f'cannot {verb} resource "locusttests" in API group "locust.io" {scope}'
            )
            return _send(h, 403, status(403, message, {"group": GROUP, "kind": "locusttests"}))
        if name:
            if namespace is None:
                return _send(
                    h, 404, status(404, "the server could not find the requested resource")
                )
            return self._get(h, version, namespace, name)
        if query.get("watch") in TRUE:
            return self._watch(h, version, namespace, query, cut)
        return self._list(h, version, namespace, query)

    def _get(self, h: _Handler, version: str, namespace: str, name: str) -> None:
        with self._cond:
            obj = self._objects.get((namespace, name))
            if self._holding:
                self._held += 1
                while self._holding and not self._stopping.is_set():
                    self._cond.wait(0.05)
                self._held -= 1
        if obj is None:
            details = {"name": name, "group": GROUP, "kind": "locusttests"}
            return _send(h, 404, status(404, f'locusttests.locust.io "{name}" not found', details))
        _send(h, 200, _render(obj, version))

    def _list(
        self, h: _Handler, version: str, namespace: str | None, query: dict[str, str]
    ) -> None:
        with self._cond:
            resource_version = self._resource_version
            items = [o for k, o in sorted(self._objects.items()) if namespace in (None, k[0])]
        after: list[str] = []
        if query.get("continue"):
            token = json.loads(base64.urlsafe_b64decode(query["continue"]))
            resource_version, after = token["rv"], token["after"]
            items = [o for o in items if _key(o) > tuple(after)]
        metadata: dict[str, Any] = {"resourceVersion": str(resource_version)}
        limit = int(query.get("limit") or 0)
        if limit and len(items) > limit:
            items = items[:limit]
            token = {"rv": resource_version, "after": list(_key(items[-1]))}
            metadata["continue"] = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
        body = {
            "apiVersion": f"{GROUP}/{version}",
            "kind": "LocustTestList",
            "metadata": metadata,
            "items": [_render(o, version) for o in items],
        }
        _send(h, 200, body)

    def _watch(
        self, h: _Handler, version: str, namespace: str | None, query: dict[str, str], cut: int
    ) -> None:
        start = query.get("resourceVersion", "")
        bookmarks = query.get("allowWatchBookmarks") in TRUE
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        with self._cond:
            if start in ("", "0"):
                # No resourceVersion: the current state as synthetic ADDED events, then changes.
                position = self._resource_version
                initial = [
                    {"type": "ADDED", "object": _render(o, version)}
                    for k, o in sorted(self._objects.items())
                    if namespace in (None, k[0])
                ]
            elif int(start) < self._compacted:
                message = f"too old resource version: {start} ({self._compacted})"
                initial = [{"type": "ERROR", "object": status(410, message)}]
                position = -1
            else:
                position, initial = int(start), []
        try:
            for event in initial:
                _chunk(h, event)
            if position < 0 or self.end_watches:
                _chunk(h, None)
                return
            deadline = time.monotonic() + timeout if timeout else float("inf")
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                with self._cond:
                    if self._stopping.is_set() or self._cut != cut:
                        h.close_connection = True
                        _shutdown(h.connection)
                        return
                    if self.silent:
                        self._cond.wait(0.05)
                        continue
                    now = time.monotonic()
                    due = [
                        e
                        for e in self._history
                        if e.resource_version > position and e.at <= now - self.lag
                    ]
                    if not due and now < deadline and not (bookmarks and now >= next_bookmark):
                        self._cond.wait(0.05)
                        continue
                for event in due:
                    position = event.resource_version
                    if namespace in (None, event.obj["metadata"]["namespace"]):
                        _chunk(h, {"type": event.type, "object": _render(event.obj, version)})
                if bookmarks and now >= next_bookmark:
                    next_bookmark = now + self.bookmark_interval
                    bookmark = {
                        "kind": "LocustTest",
                        "apiVersion": f"{GROUP}/{version}",
                        "metadata": {"resourceVersion": str(position)},
                    }
                    _chunk(h, {"type": "BOOKMARK", "object": bookmark})
                if now >= deadline:
                    _chunk(h, None)
                    return
        except OSError:
            h.close_connection = True


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return (obj["metadata"]["namespace"], obj["metadata"]["name"])


def _render(obj: dict[str, Any], version: str) -> dict[str, Any]:
    """The object as served in `version` (the real API converts; here only apiVersion changes)."""
    return {**obj, "apiVersion": f"{GROUP}/{version}", "kind": "LocustTest"}


def _send(h: _Handler, code: int, body: dict[str, Any]) -> None:
    _send_data(h, code, json.dumps(body).encode(), "application/json")


def _send_data(h: _Handler, code: int, data: bytes, content_type: str) -> None:
    h.send_response(code)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


def _chunk(h: _Handler, event: dict[str, Any] | None) -> None:
    """One newline-terminated JSON event as an HTTP chunk; None ends the stream."""
    if event is None:
        h.wfile.write(b"0\r\n\r\n")
        return
    data = json.dumps(event).encode() + b"\n"
    h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the peer
        conn.shutdown(socket.SHUT_RDWR)
