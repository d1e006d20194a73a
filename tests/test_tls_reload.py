"""Certificate hot reload: new handshakes get the new certificate, no request fails, a bad
pair is refused and the old one kept."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from cryptography.x509.oid import NameOID
from fixtures import operator_pod, review
from prometheus_client import REGISTRY
from server_process import BIN, Server, serve, wait_ready

BODY = json.dumps(review(operator_pod("any", "worker"))).encode()


def certs(directory: Path, days: int) -> Path:
    command = [str(BIN / "locust-webhook"), "certs", "--out-dir", str(directory)]
    command += ["--service", "localhost", "--days", str(days), "--renew-before-days", "1"]
    subprocess.run(command, check=True, capture_output=True, timeout=30)
    return directory


def self_signed(not_before: datetime, not_after: datetime) -> tuple[x509.Certificate, bytes]:
    """A certificate for localhost valid from `not_before` to `not_after`, and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def write_self_signed(directory: Path, not_before: datetime, not_after: datetime) -> Path:
    """tls.crt and tls.key of a self-signed pair in `directory`; ca.crt is the certificate."""
    cert, key = self_signed(not_before, not_after)
    directory.mkdir(exist_ok=True)
    for name in ("ca.crt", "tls.crt"):
        (directory / name).write_bytes(cert.public_bytes(Encoding.PEM))
    (directory / "tls.key").write_bytes(key)
    return directory


def fingerprint(directory: Path) -> str:
    pem = (directory / "tls.crt").read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()


class SecretVolume:
    """A directory laid out like a mounted Secret: files are symlinks through `..data`, and an
    update swaps `..data` atomically (what the kubelet does)."""

    def __init__(self, root: Path, first: Path) -> None:
        self.root = root
        root.mkdir()
        self._generation = 0
        self.publish(first)
        for name in ("ca.crt", "tls.crt", "tls.key"):
            (root / name).symlink_to(Path("..data") / name)

    def publish(self, source: Path) -> None:
        self._generation += 1
        target = self.root / f"..gen{self._generation}"
        target.mkdir()
        for name in ("ca.crt", "tls.crt", "tls.key"):
            (target / name).write_bytes((source / name).read_bytes())
        link = self.root / "..data_tmp"
        link.symlink_to(target.name)
        os.replace(link, self.root / "..data")


@dataclass
class Client:
    """Admissions in a loop, each on a fresh TLS connection, recording the certificate served."""

    server: Server
    context: ssl.SSLContext
    sent: int = 0
    failed: list[str] = field(default_factory=list)
    seen: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            self.sent += 1
            try:
                conn = http.client.HTTPSConnection(
                    "localhost", self.server.port, context=self.context, timeout=10
                )
                conn.request(
                    "POST", "/mutate", body=BODY, headers={"Content-Type": "application/json"}
                )
                answer = conn.getresponse()
                answer.read()
                assert conn.sock is not None
                der = conn.sock.getpeercert(binary_form=True)
                conn.close()
                if answer.status != 200:
                    self.failed.append(f"HTTP {answer.status}")
                    continue
                assert der is not None
                self.seen.append((time.monotonic(), hashlib.sha256(der).hexdigest()))
            except (OSError, AssertionError) as exc:
                self.failed.append(repr(exc))

    def wait_for(self, cert: str, timeout: float = 15.0) -> float:
        """Seconds from now until a handshake served `cert`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if any(t >= start and fp == cert for t, fp in self.seen[-50:]):
                return time.monotonic() - start
            time.sleep(0.02)
        raise TimeoutError(f"certificate {cert[:12]} not served within {timeout} s")


@pytest.fixture
def pairs(tmp_path: Path) -> tuple[Path, Path, Path]:
    return certs(tmp_path / "a", 30), certs(tmp_path / "b", 60), certs(tmp_path / "c", 90)


@pytest.fixture
def client_context(tmp_path: Path, pairs: tuple[Path, Path, Path]) -> ssl.SSLContext:
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(b"".join((p / "ca.crt").read_bytes() for p in pairs))
    return ssl.create_default_context(cafile=str(bundle))


@pytest.fixture
def running(
    tmp_path: Path, pairs: tuple[Path, Path, Path], client_context: ssl.SSLContext
) -> Iterator[tuple[Server, SecretVolume, Client]]:
    volume = SecretVolume(tmp_path / "secret", pairs[0])
    examples = tmp_path / "locusttests"
    examples.mkdir()
    with serve(
        tmp_path, "--workers", "2", "--locusttests", str(examples), cert_dir=volume.root
    ) as server:
        client = Client(server, client_context)
        thread = threading.Thread(target=client.run, daemon=True)
        thread.start()
        try:
            yield server, volume, client
        finally:
            client.stop.set()
            thread.join(timeout=15)


def expiry_metric(server: Server, context: ssl.SSLContext) -> float:
    conn = http.client.HTTPSConnection("localhost", server.port, context=context, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    line = next(
        x
        for x in text.splitlines()
        if x.startswith("locust_webhook_certificate_expiry_timestamp_seconds ")
    )
    return float(line.split()[1])


def reloads(server: Server, context: ssl.SSLContext, result: str) -> float:
    conn = http.client.HTTPSConnection("localhost", server.port, context=context, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    prefix = f'locust_webhook_certificate_reloads_total{{result="{result}"}} '
    return sum(float(x[len(prefix) :]) for x in text.splitlines() if x.startswith(prefix))


def not_after(directory: Path) -> float:
    cert = x509.load_pem_x509_certificate((directory / "tls.crt").read_bytes())
    return cert.not_valid_after_utc.timestamp()


def test_secret_update_is_served_without_a_failed_request(
    running: tuple[Server, SecretVolume, Client],
    pairs: tuple[Path, Path, Path],
    client_context: ssl.SSLContext,
) -> None:
    server, volume, client = running
    client.wait_for(fingerprint(pairs[0]))
    volume.publish(pairs[1])
    took = client.wait_for(fingerprint(pairs[1]))
    volume.publish(pairs[2])
    took_again = client.wait_for(fingerprint(pairs[2]))
    time.sleep(0.5)
    client.stop.set()
    print(
        f"\nhot reload: {client.sent} requests on fresh connections, {len(client.failed)} "
        f"failed; new certificate served after {took:.2f} s and {took_again:.2f} s"
    )
    assert client.failed == []
    assert client.sent > 20
    # Every worker reports the new expiry once it has served a handshake with it.
    deadline = time.monotonic() + 10
    while expiry_metric(server, client_context) != not_after(pairs[2]):
        assert time.monotonic() < deadline, "certificate expiry metric not updated"
        time.sleep(0.2)
    assert reloads(server, client_context, "loaded") >= 1


def test_mismatched_pair_is_refused_and_the_old_one_kept(
    running: tuple[Server, SecretVolume, Client],
    pairs: tuple[Path, Path, Path],
) -> None:
    server, volume, client = running
    old = fingerprint(pairs[0])
    client.wait_for(old)
    # A non-atomic update: the certificate lands first, its key a moment later.
    data = volume.root / "..data"
    (data / "tls.crt").write_bytes((pairs[1] / "tls.crt").read_bytes())
    deadline = time.monotonic() + 10
    while "keeping the current certificate" not in server.log():
        assert time.monotonic() < deadline, "the mismatched pair was not reported"
        time.sleep(0.1)
    start = time.monotonic()
    while time.monotonic() - start < 1.5:
        assert client.seen[-1][1] == old
        time.sleep(0.1)
    (data / "tls.key").write_bytes((pairs[1] / "tls.key").read_bytes())
    client.wait_for(fingerprint(pairs[1]))
    client.stop.set()
    assert client.failed == []
    assert "is not the key of" in server.log()


def test_a_refused_pair_is_reported_once_per_worker(
    running: tuple[Server, SecretVolume, Client],
    pairs: tuple[Path, Path, Path],
    tmp_path: Path,
    client_context: ssl.SSLContext,
) -> None:
    """Not once a second until the files change again: one warning per bad update."""
    server, volume, client = running
    client.wait_for(fingerprint(pairs[0]))
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    for name, source in (("ca.crt", pairs[1]), ("tls.crt", pairs[1]), ("tls.key", pairs[0])):
        (mismatched / name).write_bytes((source / name).read_bytes())
    volume.publish(mismatched)  # atomically: each worker sees one new version of the files
    deadline = time.monotonic() + 10
    while "keeping the current certificate" not in server.log():
        assert time.monotonic() < deadline, "the mismatched pair was not reported"
        time.sleep(0.1)
    time.sleep(3)  # three check intervals, each worker serving handshakes all along
    client.stop.set()
    assert client.failed == []
    assert server.log().count("keeping the current certificate") <= 2  # 2 workers
    assert 1 <= reloads(server, client_context, "rejected") <= 2


def test_half_written_certificate_is_refused(
    running: tuple[Server, SecretVolume, Client],
    pairs: tuple[Path, Path, Path],
) -> None:
    server, volume, client = running
    client.wait_for(fingerprint(pairs[0]))
    pem = (pairs[1] / "tls.crt").read_bytes()
    (volume.root / "..data" / "tls.crt").write_bytes(pem[: len(pem) // 2])
    deadline = time.monotonic() + 10
    while "keeping the current certificate" not in server.log():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.2)
    client.stop.set()
    assert client.failed == []
    assert client.seen[-1][1] == fingerprint(pairs[0])


@pytest.mark.parametrize(
    ("since", "years"),
    [
        (datetime.now(UTC), 1),  # UTCTime
        (datetime.now(UTC), 40),  # GeneralizedTime from 2050
        (datetime(1955, 1, 1, tzinfo=UTC), 1),  # UTCTime 55 is 1955 (RFC 5280), not 2055
        (datetime(1999, 12, 31, tzinfo=UTC), 1),  # and 99 is 1999, 00 is 2000
    ],
    ids=["now", "past 2049", "1955", "1999"],
)
def test_validity_reads_the_certificate_dates(since: datetime, years: int) -> None:
    from webhook.tls import validity

    now = since.replace(microsecond=0)
    cert, _ = self_signed(now, now + timedelta(days=365 * years))
    pem = cert.public_bytes(Encoding.PEM)
    assert validity(b"junk\n" + pem) == (
        cert.not_valid_before_utc.timestamp(),
        cert.not_valid_after_utc.timestamp(),
    )
    with pytest.raises(ValueError):
        validity(pem[: len(pem) // 2])


def test_connections_share_one_context_until_the_files_change(
    tmp_path: Path, pairs: tuple[Path, Path, Path]
) -> None:
    """gunicorn builds a context for every connection by default (~0.9 ms of CPU each): the
    server hands it the one it holds, and builds a new one only for new files."""
    from gunicorn.sock import ssl_context

    from webhook.config import ServeSettings
    from webhook.server import WebhookServer

    volume = SecretVolume(tmp_path / "volume", pairs[0])
    settings = ServeSettings(
        cert_file=str(volume.root / "tls.crt"),
        key_file=str(volume.root / "tls.key"),
        locusttests=str(tmp_path),
    )
    config = WebhookServer(settings).cfg
    first = ssl_context(config)  # what gunicorn calls for each new connection
    time.sleep(1.1)  # past the check interval: the files are looked at again
    assert ssl_context(config) is first
    volume.publish(pairs[1])
    time.sleep(1.1)
    second = ssl_context(config)
    assert second is not first
    assert ssl_context(config) is second


def test_a_worker_started_while_the_key_is_missing_serves_and_the_server_stays_up(
    tmp_path: Path,
) -> None:
    """A worker that gunicorn starts while a file is missing for a moment (a Secret update, a
    renewal), after another one crashed or was killed, serves the certificate it has. It used to
    fail its boot, and gunicorn then stopped the whole server."""
    examples = tmp_path / "locusttests"
    examples.mkdir()
    with serve(tmp_path, "--workers", "2", "--locusttests", str(examples)) as server:
        workers = server.workers(2)
        key = server.cert_dir / "tls.key"
        key.rename(server.cert_dir / "tls.key.bak")
        try:
            os.kill(min(workers), signal.SIGKILL)
            deadline = time.monotonic() + 15
            while not set(server.children()) - workers:
                assert server.process.poll() is None, server.log()
                assert time.monotonic() < deadline, "no worker started in place of the killed one"
                time.sleep(0.05)
            time.sleep(2)  # the new worker boots, or fails to and the server stops
            assert server.process.poll() is None, server.log()
            for _ in range(20):  # on fresh connections: both workers answer some
                server.admit(operator_pod("any", "worker"))
        finally:
            (server.cert_dir / "tls.key.bak").rename(key)
    assert "Worker failed to boot" not in server.log()


@pytest.mark.parametrize(
    ("valid_from", "valid_until", "said"),
    [(-30, -1, "expired at"), (1, 30, "is not valid before")],
    ids=["expired", "not yet valid"],
)
def test_a_certificate_not_valid_now_is_served_with_an_error_at_start(
    tmp_path: Path, valid_from: int, valid_until: int, said: str
) -> None:
    """The API server refuses it, but certgen or cert-manager may be about to replace it, and
    the reload picks the new one up: serving beats not starting; the log says what is wrong."""
    now = datetime.now(UTC).replace(microsecond=0)
    start, end = now + timedelta(days=valid_from), now + timedelta(days=valid_until)
    cert_dir = write_self_signed(tmp_path / "certs", start, end)
    examples = tmp_path / "locusttests"
    examples.mkdir()
    with serve(
        tmp_path, "--workers", "2", "--locusttests", str(examples), cert_dir=cert_dir, ready=False
    ) as server:
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        wait_ready(server.url, unverified, server.process)
    moment = start if valid_from > 0 else end
    errors = [
        line["message"]
        for line in map(json.loads, server.log().splitlines())
        if line.get("level") == "error"
    ]
    assert len(errors) == 1, errors  # said once, by the master
    assert f"{said} {moment:%Y-%m-%dT%H:%M:%SZ}" in errors[0]
    assert "the API server will refuse it" in errors[0]


def install(source: Path, target: Path) -> None:
    """Replace the pair in `target` by the one in `source`, each file by a rename."""
    for name in ("tls.crt", "tls.key"):
        staged = target / f".{name}.new"
        staged.write_bytes((source / name).read_bytes())
        os.replace(staged, target / name)


def rejected_reloads() -> float:
    labels = {"result": "rejected"}
    return REGISTRY.get_sample_value("locust_webhook_certificate_reloads_total", labels) or 0.0


def test_a_valid_certificate_is_not_replaced_by_an_expired_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from webhook.tls import ReloadingContext

    now = datetime.now(UTC).replace(microsecond=0)
    served = write_self_signed(tmp_path / "served", now - timedelta(days=1), now + timedelta(1))
    expired_at = now - timedelta(hours=1)
    expired = write_self_signed(tmp_path / "expired", now - timedelta(days=1), expired_at)
    tls = ReloadingContext(str(served / "tls.crt"), str(served / "tls.key"), check_interval=0)
    first = tls.context()
    rejected = rejected_reloads()
    install(expired, served)
    with caplog.at_level(logging.INFO, logger="webhook.tls"):
        assert tls.context() is first
        assert tls.context() is first
    assert [r.getMessage() for r in caplog.records] == [
        f"keeping the current certificate: {served / 'tls.crt'} expired at "
        f"{expired_at:%Y-%m-%dT%H:%M:%SZ}"
    ]
    assert rejected_reloads() == rejected + 1


def test_a_certificate_not_valid_yet_is_loaded_once_it_is(tmp_path: Path) -> None:
    """Issuers date a certificate from the moment they sign it, by their own clock: one read
    a moment before that is loaded when the moment comes, not refused for good."""
    from webhook.tls import ReloadingContext

    now = datetime.now(UTC).replace(microsecond=0)
    served = write_self_signed(tmp_path / "served", now - timedelta(days=1), now + timedelta(1))
    soon = now + timedelta(seconds=4)
    early = write_self_signed(tmp_path / "early", soon, soon + timedelta(days=1))
    tls = ReloadingContext(str(served / "tls.crt"), str(served / "tls.key"), check_interval=0)
    first = tls.context()
    rejected = rejected_reloads()
    install(early, served)
    checked = 0
    while time.time() < soon.timestamp():
        assert tls.context() is first
        checked += 1
        time.sleep(0.1)
    assert checked > 5  # refused while it was not valid, not merely never asked
    assert tls.context() is not first
    tls.publish()
    assert expiry() == (soon + timedelta(days=1)).timestamp()
    assert rejected_reloads() == rejected + 1


def expiry() -> float | None:
    return REGISTRY.get_sample_value("locust_webhook_certificate_expiry_timestamp_seconds")


def test_a_missing_file_is_said_once_until_the_files_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every check (about once a second with traffic) logged and counted it again."""
    from webhook.tls import ReloadingContext

    now = datetime.now(UTC).replace(microsecond=0)
    served = write_self_signed(tmp_path / "served", now - timedelta(1), now + timedelta(1))
    key = served / "tls.key"
    tls = ReloadingContext(str(served / "tls.crt"), str(key), check_interval=0)
    first = tls.context()
    rejected = rejected_reloads()
    with caplog.at_level(logging.WARNING, logger="webhook.tls"):
        for _ in range(2):  # gone, back as it was, gone again: said each time it goes
            key.rename(served / "tls.key.bak")
            for _ in range(5):
                assert tls.context() is first
            (served / "tls.key.bak").rename(key)
            assert tls.context() is first
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("keeping the current certificate" in m for m in said), said
    assert rejected_reloads() == rejected + 2


def test_a_certificate_not_valid_yet_is_kept_over_an_expired_one(tmp_path: Path) -> None:
    """Only an expired current certificate gives way to files the API server would refuse: one
    not valid yet (a few seconds of clock skew) soon will be."""
    from webhook.tls import ReloadingContext

    now = datetime.now(UTC).replace(microsecond=0)
    served = write_self_signed(tmp_path / "served", now + timedelta(hours=1), now + timedelta(1))
    expired = write_self_signed(tmp_path / "expired", now - timedelta(2), now - timedelta(1))
    tls = ReloadingContext(str(served / "tls.crt"), str(served / "tls.key"), check_interval=0)
    first = tls.context()
    install(expired, served)
    assert tls.context() is first
    # An expired current pair takes anything that loads.
    later = write_self_signed(tmp_path / "later", now + timedelta(hours=2), now + timedelta(2))
    expired_tls = ReloadingContext(str(expired / "tls.crt"), str(expired / "tls.key"), 0)
    stale = expired_tls.context()
    install(later, expired)
    assert expired_tls.context() is not stale


def test_the_master_takes_up_the_files_before_forking_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker forked late (in place of one that died) starts from the pair its siblings
    serve, not from the one the master loaded at start; nothing is said or counted by the
    master: the workers do that."""
    from webhook.tls import ReloadingContext

    now = datetime.now(UTC).replace(microsecond=0)
    served = write_self_signed(tmp_path / "served", now - timedelta(1), now + timedelta(1))
    renewed = write_self_signed(tmp_path / "renewed", now - timedelta(1), now + timedelta(30))
    expired = write_self_signed(tmp_path / "expired", now - timedelta(2), now - timedelta(1))
    # check_interval: the master never hands out contexts, only refresh() reloads
    master = ReloadingContext(str(served / "tls.crt"), str(served / "tls.key"), 3600)
    first = master.context()
    rejected = rejected_reloads()
    with caplog.at_level(logging.DEBUG, logger="webhook.tls"):
        install(expired, served)
        master.refresh()
        assert master.context() is first  # refused as a worker would, but not remembered
        install(renewed, served)
        master.refresh()
        assert master.context() is not first
    assert caplog.records == []
    assert rejected_reloads() == rejected
    master.publish()  # what a worker forked now does first
    assert expiry() == (now + timedelta(30)).timestamp()
