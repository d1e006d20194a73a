"""`locust-webhook serve` as a subprocess, the way a user runs it, for tests over real TLS."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fixtures import review

BIN = Path(sys.executable).parent


WATCHER = "webhook.watcher"  # in the watcher process's command line


def free_port() -> int:
    """A port nothing listens on now (reuse_port makes every worker bind it on its own)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_certs(directory: Path) -> Path:
    """Development certificates for localhost, made by the project's own command."""
    subprocess.run(
        [
            str(BIN / "locust-webhook"),
            "certs",
            "--out-dir",
            str(directory),
            "--service",
            "localhost",
        ],
        check=True,
        capture_output=True,
    )
    return directory


@dataclass
class Server:
    """A running webhook: where it listens and how to trust it."""

    process: subprocess.Popen[bytes]
    port: int
    ca_file: Path
    cert_dir: Path
    log_file: Path
    admissions: int = 0  # answered through admit()

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def log(self) -> str:
        return self.log_file.read_text()

    def children(self) -> dict[int, str]:
        """The serve process's children and their command lines (a restarted watcher process
        is a child of the master's supervising thread: every thread's list is read)."""
        pids = []
        for listing in Path(f"/proc/{self.process.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids += listing.read_text().split()
        children = {}
        for child in pids:
            with contextlib.suppress(OSError):  # gone meanwhile
                children[int(child)] = Path(f"/proc/{child}/cmdline").read_text()
        return children

    def workers(self, count: int, timeout: float = 30.0) -> set[int]:
        """The gunicorn workers, once `count` are forked: one ready worker makes the server
        ready, the others may still be on their way."""
        deadline = time.monotonic() + timeout
        while True:
            workers = {pid for pid, cmd in self.children().items() if WATCHER not in cmd}
            if len(workers) >= count or time.monotonic() > deadline:
                return workers
            time.sleep(0.05)

    def watcher(self) -> int:
        """The pid of the watcher process (serving from a cluster)."""
        (pid,) = [pid for pid, cmd in self.children().items() if WATCHER in cmd]
        return pid

    def copies_received(self) -> int:
        """How many workers have received the watcher's LocustTests (each logs it once)."""
        return self.log().count("LocustTests from the watcher")

    def metrics(self) -> str:
        """The text of GET /metrics, on a connection of its own."""
        conn = self.connection(5)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def connection(self, timeout: float = 15.0) -> http.client.HTTPSConnection:
        """A keep-alive HTTPS connection that trusts the server's CA."""
        return http.client.HTTPSConnection(
            "localhost", self.port, context=self.ssl_context(), timeout=timeout
        )

    def admit(
        self, pod: dict[str, Any], namespace: str = "default", timeout: float = 15.0
    ) -> dict[str, Any]:
        """One admission on a fresh connection: the response, after checking HTTP 200 and
        the envelope (apiVersion, kind and uid echoed)."""
        document = review(pod, namespace)
        conn = self.connection(timeout)
        try:
            status, answer = post(conn, document)
        finally:
            conn.close()
        assert status == 200, answer
        assert answer["apiVersion"] == document["apiVersion"], answer
        assert answer["kind"] == "AdmissionReview", answer
        response: dict[str, Any] = answer["response"]
        assert response["uid"] == document["request"]["uid"], answer
        self.admissions += 1
        return response


def post(conn: http.client.HTTPSConnection, document: Any) -> tuple[int, dict[str, Any]]:
    """POST a document to /mutate on `conn`: the status and the decoded answer ({} if empty)."""
    conn.request(
        "POST", "/mutate", body=json.dumps(document), headers={"Content-Type": "application/json"}
    )
    answer = conn.getresponse()
    data = answer.read()
    return answer.status, json.loads(data) if data else {}


def post_review(
    conn: http.client.HTTPSConnection, pod: dict[str, Any], namespace: str = "default"
) -> tuple[int, dict[str, Any]]:
    """POST a pod CREATE review on `conn`: the status and the response (the error body when
    there is no response)."""
    status, body = post(conn, review(pod, namespace))
    return status, dict(body.get("response") or body)


def wait_ready(
    url: str, context: ssl.SSLContext, process: subprocess.Popen[bytes], timeout: float = 30.0
) -> None:
    """Block until /readyz answers 200, or fail with what the server said."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", context=context, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}/readyz did not answer 200 within {timeout} s")


@contextlib.contextmanager
def serve(
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    cert_dir: Path | None = None,
    ready: bool = True,
) -> Iterator[Server]:
    """Start `locust-webhook serve` with its own certificates; SIGTERM and wait on exit."""
    cert_dir = cert_dir or make_certs(tmp / "certs")
    port = free_port()
    log_file = tmp / f"server-{port}.log"
    command = [
        str(BIN / "locust-webhook"),
        "serve",
        "--cert-file",
        str(cert_dir / "tls.crt"),
        "--key-file",
        str(cert_dir / "tls.key"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    server = Server(process, port, cert_dir / "ca.crt", cert_dir, log_file)
    try:
        if ready:
            wait_ready(server.url, server.ssl_context(), process)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
