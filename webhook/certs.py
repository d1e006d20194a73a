"""`locust-webhook certs`: a CA and a serving certificate, like kube-webhook-certgen does.

Two places to keep them:

- `--out-dir DIR`, for local use: `ca.crt`, `ca.key`, `tls.crt`, `tls.key` (keys mode 0600).
- `--secret NAME --webhook-config NAME`, in a cluster: a `kubernetes.io/tls` Secret holding
  `tls.crt`, `tls.key`, `ca.crt` and `ca.key` (the Deployment mounts only the first two), and
  the `caBundle` of every webhook of the MutatingWebhookConfiguration.

Every run is idempotent: a certificate still valid for the requested names and further than
`--renew-before-days` from its expiry is kept and nothing is written. The serving certificate is
renewed under the same CA, so `caBundle` does not change. When the CA itself must go (it would
expire before a new serving certificate), the bundle lists the new CA first and keeps the older
CAs until they expire, and is published before the serving certificate that needs it: a client
trusts both while the servers switch, so no request fails.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import DNS_LABEL, Option, SettingError, add_options, named, resolve, text

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
LOCAL_IPS: tuple[IPAddress, ...] = (
    ipaddress.IPv4Address("127.0.0.1"),
    ipaddress.IPv6Address("::1"),
)


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    """ECDSA keys sign; only the CA's signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


# Clocks of the API server and the node writing the certificate may disagree a little.
CLOCK_SKEW = timedelta(hours=1)
CONFLICT_RETRIES = 3
OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


# --- settings -------------------------------------------------------------------------------


def _days(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingError(f"must be a whole number of days, got {raw!r}") from None
    if not 1 <= value <= 36500:
        raise SettingError(f"must be between 1 and 36500 days, got {value}")
    return value


def _label(raw: str) -> str:
    if not DNS_LABEL.fullmatch(raw):
        raise SettingError(f"must be a DNS label (lowercase letters, digits, '-'), got {raw!r}")
    return raw


def _optional_name(raw: str) -> str:
    if raw and not OBJECT_NAME.fullmatch(raw):
        raise SettingError(f"must be a Kubernetes object name, got {raw!r}")
    return raw


CERTS_OPTIONS = (
    Option("--service", "locust-webhook", _label, "name of the webhook's Service"),
    Option("--namespace", "locust-webhook", _label, "namespace of the Service and the Secret"),
    Option("--out-dir", "", text, "write ca.crt, ca.key, tls.crt, tls.key here (local use)"),
    Option("--secret", "", _optional_name, "TLS Secret to create or update (in a cluster)"),
    Option(
        "--webhook-config",
        "",
        _optional_name,
        "MutatingWebhookConfiguration whose caBundle is patched (in a cluster)",
    ),
    Option("--days", "365", _days, "validity of the serving certificate"),
    Option("--ca-days", "3650", _days, "validity of the CA (at least twice --days)"),
    Option(
        "--renew-before-days",
        "30",
        _days,
        "renew the serving certificate when it expires within this many days",
    ),
    Option(
        "--kubeconfig",
        "",
        text,
        "kubeconfig to use (empty: in-cluster config, else KUBECONFIG / ~/.kube/config)",
    ),
)


@dataclass(frozen=True)
class Names:
    """Who the serving certificate is for."""

    service: str
    namespace: str

    @property
    def dns(self) -> tuple[str, ...]:
        s, ns = self.service, self.namespace
        return (s, f"{s}.{ns}", f"{s}.{ns}.svc", f"{s}.{ns}.svc.cluster.local")

    @property
    def ips(self) -> tuple[IPAddress, ...]:
        # Local development serves on the loopback address, which clients dial by IP too.
        return LOCAL_IPS if self.service == "localhost" else ()


@dataclass(frozen=True)
class Validity:
    """How long certificates last and when they are renewed."""

    days: int = 365
    ca_days: int = 3650
    renew_before_days: int = 30

    def check(self) -> None:
        """Refuse combinations that would renew on every run."""
        if self.renew_before_days >= self.days:
            raise SettingError(
                f"{named('--renew-before-days')} must be less than {named('--days')}"
            )
        # A CA is replaced once it has less than --days left: it serves ca_days - days.
        if self.ca_days < 2 * self.days:
            raise SettingError(
                f"{named('--ca-days')} must be at least twice {named('--days')} (a CA is "
                "replaced once it has less than --days left, so a shorter one would be replaced "
                "every few runs)"
            )


@dataclass(frozen=True)
class CertsSettings:
    """Everything `locust-webhook certs` needs."""

    names: Names
    validity: Validity
    out_dir: str
    secret: str
    webhook_config: str
    kubeconfig: str


def certs_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> CertsSettings:
    """Settings from flags, else environment (`LOCUST_WEBHOOK_*`), else defaults; validated."""
    values = resolve(CERTS_OPTIONS, args, environ)
    validity = Validity(values["days"], values["ca_days"], values["renew_before_days"])
    validity.check()
    in_cluster = bool(values["secret"] or values["webhook_config"])
    if bool(values["out_dir"]) == in_cluster:
        raise SettingError(
            f"give either {named('--out-dir')}, or {named('--secret')} and "
            f"{named('--webhook-config')}"
        )
    if in_cluster and not (values["secret"] and values["webhook_config"]):
        raise SettingError(f"{named('--secret')} and {named('--webhook-config')} go together")
    return CertsSettings(
        names=Names(values["service"], values["namespace"]),
        validity=validity,
        out_dir=values["out_dir"],
        secret=values["secret"],
        webhook_config=values["webhook_config"],
        kubeconfig=values["kubeconfig"],
    )


# --- issuing and checking certificates ------------------------------------------------------


@dataclass(frozen=True)
class Material:
    """PEM as stored: the CA bundle (current CA first, older CAs after), its key, the pair."""

    ca_bundle: bytes
    ca_key: bytes
    tls_crt: bytes
    tls_key: bytes


@dataclass(frozen=True)
class Plan:
    """What to store, and why it differs from what is stored (no changes: keep it)."""

    material: Material
    changes: tuple[str, ...]

    @property
    def not_after(self) -> datetime:
        """Expiry of the serving certificate."""
        return x509.load_pem_x509_certificate(self.material.tls_crt).not_valid_after_utc


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: handshakes 1.3-1.5x cheaper than RSA-2048 (SPEC section 8).
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def issue_ca(
    names: Names, days: int, now: datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA that may only sign leaf certificates."""
    key = _new_key()
    # The timestamp tells rotated CAs apart in a bundle.
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"{names.service}-ca@{int(now.timestamp())}")]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_serving(
    names: Names,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
    now: datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate for the Service's DNS names, signed by the CA."""
    key = _new_key()
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in names.dns]
    sans += [x509.IPAddress(ip) for ip in names.ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names.dns[2])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # Strict verifiers (Python >= 3.13, Go) want the chain linked by key identifiers.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _p256(key: object) -> ec.EllipticCurvePrivateKey | None:
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    return None


def _read_bundle(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def subject_alternative_names(cert: x509.Certificate) -> set[str]:
    """The certificate's DNS names and IP addresses, as strings."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(sans.get_values_for_type(x509.DNSName)) | {
        str(ip) for ip in sans.get_values_for_type(x509.IPAddress)
    }


def _ca_problem(
    ca: x509.Certificate, key: ec.EllipticCurvePrivateKey, validity: Validity, now: datetime
) -> str | None:
    if ca.public_key() != key.public_key():
        return "ca.key is not the key of the first CA in ca.crt"
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        return "the first certificate in ca.crt is not a CA"
    # A serving certificate must never outlive the CA that signed it.
    if ca.not_valid_after_utc < now + timedelta(days=validity.days):
        return f"the CA expires on {ca.not_valid_after_utc:%Y-%m-%d}, before a new certificate"
    return None


def _serving_problem(
    cert: x509.Certificate,
    key: object,
    ca: x509.Certificate,
    names: Names,
    validity: Validity,
    now: datetime,
) -> str | None:
    p256 = _p256(key)
    if p256 is None:
        return "tls.key is not an ECDSA P-256 key"
    if cert.public_key() != p256.public_key():
        return "tls.key is not the key of tls.crt"
    wanted = set(names.dns) | {str(ip) for ip in names.ips}
    have = subject_alternative_names(cert)
    if have != wanted:
        return f"tls.crt is for {sorted(have)}, not {sorted(wanted)}"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "tls.crt is not signed by the current CA"
    if cert.not_valid_after_utc < now + timedelta(days=validity.renew_before_days):
        return f"tls.crt expires on {cert.not_valid_after_utc:%Y-%m-%d}"
    return None


def _unexpired(cas: Sequence[x509.Certificate], now: datetime) -> list[x509.Certificate]:
    return [ca for ca in cas if ca.not_valid_after_utc > now]


def _bundle(cas: Sequence[x509.Certificate]) -> bytes:
    return b"".join(_cert_pem(ca) for ca in cas)


def reconcile(
    current: Material | None,
    names: Names,
    validity: Validity,
    now: datetime,
    trusted: Sequence[x509.Certificate] = (),
) -> Plan:
    """What to store: `current` itself when it is still good, else renewed material and why.

    `trusted`: the CAs clients trust now (the webhook's caBundle). A new CA is published with
    them, as with the older CAs of `current`: servers may still present a certificate one of
    them signed (the Secret was deleted, but the pods serve the files they mounted)."""
    if current is None:
        return _new_ca(names, validity, now, trusted, why="no certificate yet")
    bundle = _read_bundle(current.ca_bundle)
    older = [*bundle, *trusted]
    try:
        ca_key = _p256(serialization.load_pem_private_key(current.ca_key, password=None))
    except (ValueError, TypeError) as exc:
        return _new_ca(names, validity, now, older, why=f"unreadable CA key: {exc}")
    if not bundle or ca_key is None:
        return _new_ca(names, validity, now, older, why="no usable P-256 CA key and certificate")
    ca = bundle[0]
    problem = _ca_problem(ca, ca_key, validity, now)
    if problem:
        return _new_ca(names, validity, now, older, why=problem)
    live = _unexpired(bundle, now)
    try:
        tls_crt = x509.load_pem_x509_certificate(current.tls_crt)
        tls_key = serialization.load_pem_private_key(current.tls_key, password=None)
    except (ValueError, TypeError):
        problem = "tls.crt or tls.key is missing or unreadable"
    else:
        problem = _serving_problem(tls_crt, tls_key, ca, names, validity, now)
    if problem:
        cert, key = issue_serving(names, ca, ca_key, validity.days, now)
        material = Material(_bundle(live), current.ca_key, _cert_pem(cert), _key_pem(key))
        return Plan(material, (f"renewed the serving certificate: {problem}",))
    if len(live) < len(bundle):
        dropped = len(bundle) - len(live)
        return Plan(replace(current, ca_bundle=_bundle(live)), (f"dropped {dropped} expired CA",))
    return Plan(current, ())


def _new_ca(
    names: Names, validity: Validity, now: datetime, older: Sequence[x509.Certificate], why: str
) -> Plan:
    ca, ca_key = issue_ca(names, validity.ca_days, now)
    cert, key = issue_serving(names, ca, ca_key, validity.days, now)
    # Older CAs stay trusted until they expire: servers still present certificates they signed.
    kept = [old for old in dict.fromkeys(_unexpired(older, now)) if old != ca]
    material = Material(_bundle([ca, *kept]), _key_pem(ca_key), _cert_pem(cert), _key_pem(key))
    trusted = f" (still trusting {len(kept)} older CA)" if kept else ""
    return Plan(material, (f"issued a new CA and serving certificate{trusted}: {why}",))


# --- local files ----------------------------------------------------------------------------

# The files' names, and the Secret's keys.
FILES = {"ca_bundle": "ca.crt", "ca_key": "ca.key", "tls_crt": "tls.crt", "tls_key": "tls.key"}


def read_dir(directory: str) -> Material | None:
    """The material in `directory`; None when none of the files is there."""
    found: dict[str, bytes] = {}
    for attr, name in FILES.items():
        try:
            with open(os.path.join(directory, name), "rb") as handle:
                found[attr] = handle.read()
        except FileNotFoundError:
            found[attr] = b""
    return Material(**found) if any(found.values()) else None


def _stage(directory: str, name: str, data: bytes) -> str:
    """A complete, synced temporary file next to `name` (keys 0600), to be renamed into place."""
    fd, path = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        os.fchmod(fd, 0o600 if name.endswith(".key") else 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(path)
        raise
    return path


def write_dir(directory: str, material: Material) -> None:
    """Write the files that changed, each atomically (temporary file + rename).

    The CA files go first so a client reading ca.crt trusts the new CA before the server
    presents a certificate it signed. The key and the certificate are both staged completely
    before either is renamed, then renamed back to back: a reader (the server's hot reload)
    can see a new key beside the old certificate only for the microseconds between two
    renames; it refuses such a pair, keeps serving the old one and loads the new pair at its
    next check.
    """
    os.makedirs(directory, exist_ok=True)
    current = read_dir(directory)
    for group in (("ca_bundle", "ca_key"), ("tls_key", "tls_crt")):
        staged: list[tuple[str, str]] = []
        try:
            for attr in group:
                data: bytes = getattr(material, attr)
                if current is None or getattr(current, attr) != data:
                    target = os.path.join(directory, FILES[attr])
                    staged.append((_stage(directory, FILES[attr], data), target))
            for temp, target in staged:
                os.replace(temp, target)
        finally:
            for temp, _ in staged:
                if os.path.exists(temp):
                    os.unlink(temp)


def reconcile_dir(directory: str, names: Names, validity: Validity, now: datetime) -> list[str]:
    """Bring the files in `directory` up to date; returns what happened, one line each."""
    plan = reconcile(read_dir(directory), names, validity, now)
    until = f"{plan.not_after:%Y-%m-%d}"
    if not plan.changes:
        return [f"kept {directory}/: certificate valid until {until}, nothing written"]
    write_dir(directory, plan.material)
    return [
        *plan.changes,
        f"wrote {directory}/ (ca.crt, ca.key, tls.crt, tls.key), valid until {until}",
    ]


# --- cluster --------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def material_from_secret(secret: Mapping[str, Any]) -> Material | None:
    """The material stored in a Secret's data; None when it holds none of the keys."""
    data = secret.get("data") or {}
    found = {attr: base64.b64decode(data.get(key, "")) for attr, key in FILES.items()}
    return Material(**found) if any(found.values()) else None


def secret_data(material: Material) -> dict[str, str]:
    """The Secret's data for the material (base64, as the API wants it)."""
    return {key: _b64(getattr(material, attr)) for attr, key in FILES.items()}


def ca_bundle_certificates(config: Mapping[str, Any]) -> list[x509.Certificate]:
    """The CAs in the caBundles of the configuration's webhooks (unreadable ones skipped)."""
    found: list[x509.Certificate] = []
    for webhook in config.get("webhooks") or []:
        encoded = (webhook.get("clientConfig") or {}).get("caBundle")
        if isinstance(encoded, str) and encoded:
            with contextlib.suppress(ValueError):
                found += _read_bundle(base64.b64decode(encoded, validate=True))
    return list(dict.fromkeys(found))


def ca_bundle_patch(config: Mapping[str, Any], bundle: bytes) -> list[dict[str, Any]]:
    """RFC 6902 operations setting caBundle on every webhook whose bytes differ.

    Each change is guarded by a `test` of the webhook's name, so a concurrent edit of the list
    makes the patch fail instead of landing on the wrong webhook.
    """
    wanted = _b64(bundle)
    ops: list[dict[str, Any]] = []
    for index, webhook in enumerate(config.get("webhooks") or []):
        if (webhook.get("clientConfig") or {}).get("caBundle") == wanted:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{index}/name", "value": webhook["name"]})
        ops.append(
            {"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": wanted}
        )
    return ops


class Cluster:
    """The two objects the command touches, through the official client, as plain dicts."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        # Typed as Any: bodies go out as plain dicts, not the client's model classes.
        self.core: Any = client.CoreV1Api(api_client)
        self.admission: Any = client.AdmissionregistrationV1Api(api_client)

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        # Raw JSON instead of the client's model classes, which drop fields they do not know.
        return cast(dict[str, Any], json.loads(response.data))

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret, or None when it does not exist."""
        from kubernetes.client import ApiException

        try:
            return self._json(
                self.core.read_namespaced_secret(name, namespace, _preload_content=False)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_secret(self, namespace: str, body: dict[str, Any]) -> None:
        """POST a new Secret."""
        self.core.create_namespaced_secret(namespace, body, _preload_content=False)

    def replace_secret(self, namespace: str, body: dict[str, Any]) -> None:
        """PUT the Secret; its resourceVersion makes a concurrent writer's change fail (409)."""
        name = body["metadata"]["name"]
        self.core.replace_namespaced_secret(name, namespace, body, _preload_content=False)

    def read_webhook_config(self, name: str) -> dict[str, Any]:
        """The MutatingWebhookConfiguration."""
        return self._json(
            self.admission.read_mutating_webhook_configuration(name, _preload_content=False)
        )

    def patch_webhook_config(self, name: str, ops: list[dict[str, Any]]) -> None:
        """Apply RFC 6902 operations (the client sends a list as application/json-patch+json)."""
        self.admission.patch_mutating_webhook_configuration(name, ops, _preload_content=False)


def reconcile_cluster(cluster: Cluster, settings: CertsSettings, now: datetime) -> list[str]:
    """Bring the Secret and caBundle up to date; returns what happened, one line each."""
    names = settings.names
    where = f"secret {names.namespace}/{settings.secret}"
    secret = cluster.read_secret(names.namespace, settings.secret)
    config = cluster.read_webhook_config(settings.webhook_config)
    plan = reconcile(
        material_from_secret(secret) if secret else None,
        names,
        settings.validity,
        now,
        trusted=ca_bundle_certificates(config),
    )
    messages = list(plan.changes)

    # caBundle first: the API server must trust a new CA before any server presents a
    # certificate signed by it.
    ops = ca_bundle_patch(config, plan.material.ca_bundle)
    if ops:
        cluster.patch_webhook_config(settings.webhook_config, ops)
        messages.append(
            f"patched caBundle of {len(ops) // 2} webhook(s) in {settings.webhook_config}"
        )
    else:
        messages.append(f"caBundle of {settings.webhook_config} already up to date")

    until = f"{plan.not_after:%Y-%m-%d}"
    if secret is None:
        cluster.create_secret(names.namespace, _new_secret(settings, plan.material))
        messages.append(f"created {where}, valid until {until}")
    elif plan.changes:
        cluster.replace_secret(names.namespace, {**secret, "data": secret_data(plan.material)})
        messages.append(f"updated {where}, valid until {until}")
    else:
        messages.append(f"{where} already up to date, valid until {until}")
    return messages


def _new_secret(settings: CertsSettings, material: Material) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": settings.secret,
            "namespace": settings.names.namespace,
            "labels": {
                "app.kubernetes.io/name": settings.names.service,
                "app.kubernetes.io/managed-by": "locust-webhook-certs",
            },
        },
        "type": "kubernetes.io/tls",
        "data": secret_data(material),
    }


def _with_conflict_retries(action: Callable[[], list[str]]) -> list[str]:
    from kubernetes.client import ApiException

    for _ in range(CONFLICT_RETRIES - 1):
        try:
            return action()
        except ApiException as exc:
            # 409: another run (the install Job and the renewal CronJob) wrote first; start over
            # from what it wrote.
            if exc.status != 409:
                raise
    return action()


# --- command --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`locust-webhook certs`: returns the exit code."""
    settings = certs_settings(args, os.environ)
    now = datetime.now(UTC).replace(microsecond=0)
    if settings.out_dir:
        try:
            messages = reconcile_dir(settings.out_dir, settings.names, settings.validity, now)
        except OSError as exc:
            where = exc.filename or settings.out_dir
            raise SettingError(f"{named('--out-dir')}: {where}: {exc.strerror or exc}") from None
    else:
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        from .kube import NoClusterConfig, api_client

        try:
            client = api_client(settings.kubeconfig)
        except NoClusterConfig as exc:
            raise SettingError(f"{named('--kubeconfig')}: {exc}") from None
        try:
            with client:
                cluster = Cluster(client)
                messages = _with_conflict_retries(lambda: reconcile_cluster(cluster, settings, now))
        except ApiException as exc:
            print(f"locust-webhook certs: {exc.status} {exc.reason}: {exc.body}", file=sys.stderr)
            return 1
        except (HTTPError, OSError) as exc:
            host = client.configuration.host
            print(
                f"locust-webhook certs: cannot reach the Kubernetes API at {host}: {exc}",
                file=sys.stderr,
            )
            return 1
    for message in messages:
        print(f"certs: {message}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `certs` on the command line's subcommands."""
    parser = subparsers.add_parser(
        "certs",
        help="create or renew the CA and serving certificate (files, or Secret + caBundle)",
        description=(
            "Create or renew a CA and an ECDSA P-256 serving certificate for the webhook's "
            "Service. With --out-dir, write files for local use; with --secret and "
            "--webhook-config, keep them in a TLS Secret and patch caBundle. Idempotent: "
            "nothing is written while the certificates are valid for the names."
        ),
    )
    add_options(parser, CERTS_OPTIONS)
    parser.set_defaults(func=run)
