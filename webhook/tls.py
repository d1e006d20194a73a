"""The serving TLS context: built once, rebuilt only when the certificate files change.

gunicorn asks for a context on every new connection; building one costs ~1 ms of CPU, so the
context is cached and the files are only stat()ed, at most once per `check_interval`. A pair
that does not load (half-written, key not matching the certificate) is refused and the
previous context is kept, and so is a valid certificate over one expired or not valid yet.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

log = logging.getLogger(__name__)
PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
# PRIVATE KEY (PKCS#8), ENCRYPTED PRIVATE KEY, EC PRIVATE KEY, RSA PRIVATE KEY, ...
PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


class CertificateError(ValueError):
    """The certificate and key files cannot serve."""


# Seconds a request may take to arrive, handshake, head and body together, once a thread takes
# it up. The API server sends a whole review at once and gives up after timeoutSeconds (5 s).
REQUEST_READ_BUDGET = 5.0
# Seconds a closing connection waits for more of the client's data (gunicorn drains it before
# closing so that unread bytes do not turn the close into a reset). gunicorn does this on the
# worker's main loop, up to 2 s each: a client that neither sends nor closes would hold up the
# worker's every connection for that long; one still sending keeps being drained.
LINGER_IDLE = 0.05


class RequestTimedOut(ssl.SSLEOFError, TimeoutError):
    """The client did not send its request within REQUEST_READ_BUDGET.

    A TimeoutError for the app (408) and gunicorn's body drain; an SSL EOF for gunicorn's worker,
    which then closes the connection quietly instead of logging a traceback.
    """

    def __init__(self, what: str) -> None:
        super().__init__(ssl.SSL_ERROR_EOF, f"{what} not received within {REQUEST_READ_BUDGET:g} s")


class DeadlineSSLSocket(ssl.SSLSocket):
    """A TLS connection whose blocking reads end at a per-request deadline.

    gunicorn's gthread worker reads each request from a blocking socket without a timeout: a
    client that stalls or trickles mid-request would hold a worker thread forever, and a few
    such clients would block every other caller. gunicorn makes the socket blocking before each
    request (`setblocking(True)`): that starts the request's read budget. Its drain before
    closing a connection waits LINGER_IDLE at most for the client's next bytes.
    """

    _deadline = 0.0
    _closing = False

    def shutdown(self, how: int) -> None:
        super().shutdown(how)
        if how == socket.SHUT_WR:  # gunicorn's graceful close: its drain follows
            self._closing = True

    def _start_budget(self) -> None:
        self._deadline = time.monotonic() + REQUEST_READ_BUDGET
        self.settimeout(REQUEST_READ_BUDGET)

    def setblocking(self, flag: bool) -> None:
        if self.fileno() == -1:
            # Closed already: gunicorn's worker closes a connection whose TLS ends early (a
            # handshake or request that never completes, a probe), then closes it gracefully
            # again, which starts with this call. Raising here made it count the connection
            # closed twice: each such connection raised the worker's connection limit by one.
            return
        if flag:
            self._start_budget()
        else:
            super().setblocking(False)

    def _timed_out(self, what: str) -> RequestTimedOut:
        exc = RequestTimedOut(what)
        log.info("closing a connection: %s", exc.args[1], extra={"peer": self._peer()})
        return exc

    def _peer(self) -> str:
        try:
            return str(self.getpeername()[0])
        except OSError:
            return ""

    def do_handshake(self, block: bool = False) -> None:
        if self.gettimeout() is None:
            self._start_budget()
        try:
            super().do_handshake(block)
        except TimeoutError:
            raise self._timed_out("TLS handshake") from None

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        timeout = self.gettimeout()
        if timeout == 0:  # non-blocking sockets (the keep-alive poller's) are left alone
            return super().recv(buflen, flags)
        if self._closing and (timeout is None or timeout > LINGER_IDLE):
            timeout = LINGER_IDLE
            self.settimeout(timeout)
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out("request")
        if timeout is None or timeout > remaining:
            self.settimeout(remaining)
        try:
            return super().recv(buflen, flags)
        except TimeoutError:
            if time.monotonic() < self._deadline:
                raise  # a shorter timeout of the caller's own (gunicorn's body drain)
            raise self._timed_out("request") from None


@dataclass(frozen=True)
class LoadedPair:
    context: ssl.SSLContext
    not_before: float
    not_after: float
    stamp: tuple[tuple[int, int, int], ...]

    def invalid(self, now: float) -> str | None:
        """Why the certificate is not valid at `now` (Unix time), or None when it is."""
        if now >= self.not_after:
            return f"expired at {_utc(self.not_after)}"
        if now < self.not_before:
            return f"is not valid before {_utc(self.not_before)}"
        return None


def _utc(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stamp(*paths: str) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is replaced (Secret volumes swap a symlink; stat follows it)."""
    result = []
    for path in paths:
        info = os.stat(path)
        result.append((info.st_ino, info.st_mtime_ns, info.st_size))
    return tuple(result)


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _der_element(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at `pos`."""
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(der[pos : pos + size], "big")
        pos += size
    return tag, pos, pos + length


def validity(cert_pem: bytes) -> tuple[float, float]:
    """(notBefore, notAfter) of the first certificate in a PEM file, as Unix times (RFC 5280
    TBSCertificate.validity).

    Read from the DER directly: the serving processes then need no `cryptography`, whose
    import alone costs ~8 MB in every worker."""
    match = PEM_CERTIFICATE.search(cert_pem)
    if match is None:
        raise ValueError("no PEM certificate")
    der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
    _, certificate, _ = _der_element(der, 0)
    _, pos, _ = _der_element(der, certificate)  # tbsCertificate
    tag, _, end = _der_element(der, pos)
    if tag == 0xA0:  # [0] version is optional
        pos = end
    for _ in ("serialNumber", "signature", "issuer"):
        pos = _der_element(der, pos)[2]
    _, dates, _ = _der_element(der, pos)
    not_before, end = _der_time(der, dates)
    return not_before, _der_time(der, end)[0]


def _der_time(der: bytes, pos: int) -> tuple[float, int]:
    """(Unix time, end) of the UTCTime or GeneralizedTime at `pos`."""
    tag, start, end = _der_element(der, pos)
    text = der[start:end].decode("ascii")
    if tag == 0x17:  # UTCTime: YY from 50 is 19YY (RFC 5280 4.1.2.5.1; strptime's %y pivots at 69)
        text = ("19" if text[:2] >= "50" else "20") + text
    elif tag != 0x18:  # GeneralizedTime
        raise ValueError("no validity in the certificate")
    moment = datetime.strptime(text, "%Y%m%d%H%M%SZ")
    return moment.replace(tzinfo=UTC).timestamp(), end


def load_pair(cert_file: str, key_file: str) -> LoadedPair:
    """A server context for the pair; raises CertificateError when it cannot serve."""
    try:
        stamp = _stamp(cert_file, key_file)
        cert_pem, key_pem = _read(cert_file), _read(key_file)
        not_before, not_after = validity(cert_pem)
    except (OSError, ValueError, IndexError) as exc:
        raise CertificateError(f"cannot read {cert_file} / {key_file}: {exc}") from None
    if not PEM_PRIVATE_KEY.search(key_pem):
        raise CertificateError(f"{key_file} holds no PEM private key")

    def refuse_password() -> bytes:
        # Without it OpenSSL asks for the pass phrase on the terminal, and blocks.
        raise CertificateError(
            f"the private key in {key_file} is encrypted (serve needs an unencrypted key)"
        )

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Bounded reads for every connection this context wraps (see DeadlineSSLSocket).
    context.sslsocket_class = DeadlineSSLSocket
    try:
        context.load_cert_chain(cert_file, key_file, password=refuse_password)
        # The files may have been swapped between our read and OpenSSL's: only accept a load
        # of exactly the bytes that were checked.
        if _read(cert_file) != cert_pem or _read(key_file) != key_pem:
            raise CertificateError("the files changed while loading; will retry")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CertificateError(f"{key_file} is not the key of {cert_file}") from None
        raise CertificateError(f"cannot load {cert_file} / {key_file}: {exc}") from None
    except OSError as exc:
        raise CertificateError(f"cannot load {cert_file} / {key_file}: {exc}") from None
    return LoadedPair(context, not_before, not_after, stamp)


class ReloadingContext:
    """Hands out the current server context, reloading it when the files change on disk."""

    def __init__(self, cert_file: str, key_file: str, check_interval: float = 1.0) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._current = load_pair(cert_file, key_file)
        self._checked = time.monotonic()
        # The files refused last: their stamp, or the error of a file that cannot be stat()ed.
        self._rejected: tuple[tuple[int, int, int], ...] | str | None = None
        self._retry_at = math.inf  # when the rejected files are tried again (Unix time)

    def publish(self) -> None:
        """Export the serving certificate's expiry from this process (a worker, after fork)."""
        from . import metrics

        metrics.CERT_EXPIRY.set(self._current.not_after)

    def warn_if_not_valid(self) -> None:
        """Log an error when the certificate served is expired or not valid yet. It is served
        all the same: certgen or cert-manager may be about to replace it, and a reload picks
        the new files up."""
        problem = self._current.invalid(time.time())
        if problem:
            log.error(
                "%s %s: the API server will refuse it; it is served until the files are "
                "replaced (they are reloaded on change)",
                self.cert_file, problem,
            )  # fmt: skip

    def refresh(self) -> None:
        """In the gunicorn master, before it forks a worker: take up the files as a worker
        would, so that one forked late (in place of one that died) starts from the pair its
        siblings serve, not from the master's first. Silent: the workers say and count it."""
        with self._lock:
            self._reload_if_changed(quiet=True)

    def context(self) -> ssl.SSLContext:
        """The context to wrap a new connection with."""
        now = time.monotonic()
        if now - self._checked >= self.check_interval and self._lock.acquire(blocking=False):
            try:
                self._checked = now
                self._reload_if_changed()
            finally:
                self._lock.release()
        return self._current.context

    def _reload_if_changed(self, quiet: bool = False) -> None:
        now = time.time()
        stamp = None
        retry_at = math.inf
        try:
            stamp = _stamp(self.cert_file, self.key_file)
            if stamp == self._current.stamp:
                self._rejected = None  # what was refused since is gone
                return
            if stamp == self._rejected and now < self._retry_at:
                return
            pair = load_pair(self.cert_file, self.key_file)
            problem = pair.invalid(now)
            if problem and now < self._current.not_after:
                # The API server would refuse it: keep the current one unless that one has
                # expired (one not valid yet soon will be). A certificate not valid yet (its
                # issuer's clock is ahead of ours) is tried again when it is.
                retry_at = pair.not_before if now < pair.not_before else math.inf
                raise CertificateError(f"{self.cert_file} {problem}")
        except (OSError, CertificateError) as exc:
            if quiet:
                return
            # Refuse this version of the files (until `retry_at`); a later write changes the
            # stamp again. A file missing is said once, until the files change.
            refused = str(exc) if stamp is None else stamp
            if stamp is None and refused == self._rejected:
                return
            self._rejected, self._retry_at = refused, retry_at
            # Imported here: the master must not create metric files.
            from . import metrics

            metrics.CERT_RELOADS.labels("rejected").inc()
            log.warning("keeping the current certificate: %s", exc)
            return
        self._current = pair
        if quiet:
            return
        from . import metrics

        metrics.CERT_EXPIRY.set(pair.not_after)
        metrics.CERT_RELOADS.labels("loaded").inc()
        log.info("serving a new certificate", extra={"not_after": pair.not_after})
        self.warn_if_not_valid()
