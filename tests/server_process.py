"""`locust-webhook serve` as a subprocess, the way a user runs it, for tests over real TLS."""

from __future__ import annotations

import contextlib
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

BIN = Path(sys.executable).parent


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

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def log(self) -> str:
        return self.log_file.read_text()


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
