"""`locust-webhook certs`: chain, names, key type, expiry, idempotency, rotation; files, cluster."""

from __future__ import annotations

import argparse
import base64
import copy
import os
import socket
import ssl
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from kube_core_api import FakeCluster, Request, serve

from webhook.certs import (
    Material,
    Names,
    Validity,
    add_parser,
    certs_settings,
    material_from_secret,
    reconcile,
    secret_data,
    subject_alternative_names,
    write_dir,
)
from webhook.cli import main
from webhook.config import SettingError

ROOT = Path(__file__).resolve().parent.parent
SERVICE_NAMES = {
    "locust-webhook",
    "locust-webhook.locust-webhook",
    "locust-webhook.locust-webhook.svc",
    "locust-webhook.locust-webhook.svc.cluster.local",
}
NAMES = Names("locust-webhook", "locust-webhook")
SECRET = ("secrets", "locust-webhook", "locust-webhook-tls")
CONFIG = ("mutatingwebhookconfigurations", "", "locust-webhook")


def certs(*argv: str) -> int:
    """Run `locust-webhook certs ARGV` through the parser the CLI registers."""
    parser = argparse.ArgumentParser(prog="locust-webhook")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["certs", *argv])
    code: int = args.func(args)
    return code


def load_dir(directory: Path) -> tuple[list[x509.Certificate], x509.Certificate, Any]:
    """(CA bundle, serving certificate, serving key) from a --out-dir."""
    bundle = x509.load_pem_x509_certificates((directory / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((directory / "tls.crt").read_bytes())
    key = load_pem_private_key((directory / "tls.key").read_bytes(), password=None)
    return bundle, cert, key


def handshake(ca_file: Path, cert_file: Path, key_file: Path, hostname: str) -> None:
    """A real TLS handshake, verified strictly by the client against `ca_file`."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    left, right = socket.socketpair()
    errors: list[BaseException] = []

    def accept() -> None:
        try:
            with server_ctx.wrap_socket(right, server_side=True):
                pass
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        with client_ctx.wrap_socket(left, server_hostname=hostname) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        thread.join()
        right.close()
    assert not errors


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def issued_at(when: datetime, validity: Validity) -> Material:
    """Material as `certs` would have written it at `when`."""
    return reconcile(None, NAMES, validity, when).material


# --- files ----------------------------------------------------------------------------------


def test_serving_certificate_is_signed_by_the_ca_for_the_service_names(tmp_path: Path) -> None:
    before = datetime.now(UTC)
    assert certs("--out-dir", str(tmp_path), "--days", "90", "--ca-days", "400") == 0
    bundle, cert, key = load_dir(tmp_path)

    assert len(bundle) == 1
    ca = bundle[0]
    cert.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0, "the CA signs leaf certificates only"
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert subject_alternative_names(cert) == SERVICE_NAMES
    for public in (cert.public_key(), ca.public_key()):
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP256R1)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == cert.public_key()
    expected = before + timedelta(days=90)
    assert abs(cert.not_valid_after_utc - expected) < timedelta(minutes=1)
    assert abs(ca.not_valid_after_utc - (before + timedelta(days=400))) < timedelta(minutes=1)
    handshake(
        tmp_path / "ca.crt",
        tmp_path / "tls.crt",
        tmp_path / "tls.key",
        "locust-webhook.locust-webhook.svc",
    )


def test_localhost_certificate_also_covers_the_loopback_addresses(tmp_path: Path) -> None:
    assert certs("--out-dir", str(tmp_path), "--service", "localhost") == 0
    _, cert, _ = load_dir(tmp_path)
    assert {"localhost", "127.0.0.1", "::1"} <= subject_alternative_names(cert)
    handshake(tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key", "127.0.0.1")


def test_keys_are_readable_by_the_owner_only(tmp_path: Path) -> None:
    assert certs("--out-dir", str(tmp_path)) == 0
    assert (tmp_path / "tls.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "tls.crt").stat().st_mode & 0o777 == 0o644


def test_second_run_keeps_valid_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs("--out-dir", str(tmp_path)) == 0
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in tmp_path.iterdir()}
    capsys.readouterr()

    assert certs("--out-dir", str(tmp_path)) == 0

    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in tmp_path.iterdir()} == before
    assert "nothing written" in capsys.readouterr().out


def test_other_names_renew_the_serving_certificate_under_the_same_ca(tmp_path: Path) -> None:
    assert certs("--out-dir", str(tmp_path)) == 0
    ca_before = (tmp_path / "ca.crt").read_bytes()
    ca_files = {name: (tmp_path / name).stat().st_ino for name in ("ca.crt", "ca.key")}

    assert certs("--out-dir", str(tmp_path), "--service", "other", "--namespace", "perf") == 0

    bundle, cert, _ = load_dir(tmp_path)
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    assert {name: (tmp_path / name).stat().st_ino for name in ca_files} == ca_files, "not rewritten"
    assert "other.perf.svc" in subject_alternative_names(cert)
    cert.verify_directly_issued_by(bundle[0])
    assert not list(tmp_path.glob(".*")), "no temporary file is left behind"


@pytest.mark.parametrize("lost", ["tls.crt", "tls.key"])
def test_a_lost_serving_file_is_reissued_under_the_same_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lost: str
) -> None:
    assert certs("--out-dir", str(tmp_path)) == 0
    ca_before = (tmp_path / "ca.crt").read_bytes()
    (tmp_path / lost).unlink()
    capsys.readouterr()

    assert certs("--out-dir", str(tmp_path)) == 0

    bundle, cert, _ = load_dir(tmp_path)
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    cert.verify_directly_issued_by(bundle[0])
    assert "tls.crt or tls.key is missing or unreadable" in capsys.readouterr().out


def _a_file(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "file").write_text("")
    return tmp_path / "file", tmp_path / "file" / "ca.crt"


def _a_directory_named_ca_crt(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "ca.crt").mkdir()
    return tmp_path, tmp_path / "ca.crt"


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        (_a_file, "Not a directory"),
        (_a_directory_named_ca_crt, "Is a directory"),
        (lambda _: (Path("/proc/nope"), Path("/proc/nope")), "No such file or directory"),
    ],
    ids=["a file", "ca.crt a directory", "cannot be created"],
)
def test_an_out_dir_that_cannot_be_used_is_said_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    where: Callable[[Path], tuple[Path, Path]],
    reason: str,
) -> None:
    out_dir, path = where(tmp_path)
    capsys.readouterr()
    assert main(["certs", "--out-dir", str(out_dir)]) == 2
    said = capsys.readouterr().err
    assert said == f"locust-webhook certs: --out-dir (LOCUST_WEBHOOK_OUT_DIR): {path}: {reason}\n"


def with_files_of_another_ca(out_dir: Path, *names: str) -> Path:
    """Certificates issued in out_dir, then `names` replaced by those of a second, unrelated run
    (another CA), whose directory is returned."""
    assert certs("--out-dir", str(out_dir)) == 0
    other = out_dir / "other"
    assert certs("--out-dir", str(other)) == 0
    for name in names:
        (out_dir / name).write_bytes((other / name).read_bytes())
    return other


def test_a_mismatched_key_is_replaced(tmp_path: Path) -> None:
    with_files_of_another_ca(tmp_path, "tls.key")

    assert certs("--out-dir", str(tmp_path)) == 0

    _, cert, key = load_dir(tmp_path)
    assert key.public_key() == cert.public_key()


def test_a_serving_certificate_from_another_ca_is_reissued_under_the_current_one(
    tmp_path: Path,
) -> None:
    other = with_files_of_another_ca(tmp_path, "ca.crt", "ca.key")

    assert certs("--out-dir", str(tmp_path)) == 0

    assert (tmp_path / "ca.crt").read_bytes() == (other / "ca.crt").read_bytes()
    handshake(
        tmp_path / "ca.crt",
        tmp_path / "tls.crt",
        tmp_path / "tls.key",
        "locust-webhook.locust-webhook.svc",
    )


def test_a_ca_key_that_is_not_the_cas_gets_a_new_ca(tmp_path: Path) -> None:
    with_files_of_another_ca(tmp_path, "ca.key")

    assert certs("--out-dir", str(tmp_path)) == 0

    bundle, cert, _ = load_dir(tmp_path)
    ca_key = load_pem_private_key((tmp_path / "ca.key").read_bytes(), password=None)
    assert ca_key.public_key() == bundle[0].public_key(), "the next renewal can sign"
    cert.verify_directly_issued_by(bundle[0])


def test_a_serving_key_on_another_curve_is_replaced_by_a_p256_one() -> None:
    validity = Validity(days=90, ca_days=3650, renew_before_days=30)
    start = datetime(2030, 1, 1, tzinfo=UTC)
    first = issued_at(start, validity)
    ca = x509.load_pem_x509_certificate(first.ca_bundle)
    ca_key = load_pem_private_key(first.ca_key, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    served = x509.load_pem_x509_certificate(first.tls_crt)
    p384 = ec.generate_private_key(ec.SECP384R1())
    # The same certificate, names and CA, for a P-384 key (as another tool might have made it).
    cert = (
        x509.CertificateBuilder(extensions=list(served.extensions))
        .subject_name(served.subject)
        .issuer_name(ca.subject)
        .public_key(p384.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(served.not_valid_before_utc)
        .not_valid_after(served.not_valid_after_utc)
        .sign(ca_key, hashes.SHA256())
    )
    other = Material(first.ca_bundle, first.ca_key, _pem(cert), _pem_key(p384))

    plan = reconcile(other, NAMES, validity, start + timedelta(days=1))

    assert plan.changes and "P-256" in plan.changes[0]
    key = load_pem_private_key(plan.material.tls_key, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)


def test_a_leaf_certificate_in_place_of_the_ca_gets_a_new_ca() -> None:
    validity = Validity(days=90, ca_days=3650, renew_before_days=30)
    start = datetime(2030, 1, 1, tzinfo=UTC)
    first = issued_at(start, validity)
    leaf_as_ca = Material(first.tls_crt, first.tls_key, first.tls_crt, first.tls_key)

    plan = reconcile(leaf_as_ca, NAMES, validity, start + timedelta(days=1))

    assert plan.changes and "not a CA" in plan.changes[0]
    ca = x509.load_pem_x509_certificates(plan.material.ca_bundle)[0]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    x509.load_pem_x509_certificate(plan.material.tls_crt).verify_directly_issued_by(ca)


# --- renewal and rotation -------------------------------------------------------------------


def test_certificates_are_valid_for_a_client_whose_clock_is_behind() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    material = issued_at(now, Validity())
    for pem in (material.ca_bundle, material.tls_crt):
        assert x509.load_pem_x509_certificate(pem).not_valid_before_utc <= now - timedelta(
            minutes=30
        )


def test_serving_certificate_is_renewed_before_expiry_under_the_same_ca() -> None:
    validity = Validity(days=90, ca_days=3650, renew_before_days=30)
    start = datetime(2030, 1, 1, tzinfo=UTC)
    first = issued_at(start, validity)

    assert reconcile(first, NAMES, validity, start + timedelta(days=59)).changes == ()
    renewed = reconcile(first, NAMES, validity, start + timedelta(days=61))

    assert renewed.changes and "renewed the serving certificate" in renewed.changes[0]
    assert renewed.material.ca_bundle == first.ca_bundle
    assert renewed.material.tls_crt != first.tls_crt
    assert renewed.not_after == start + timedelta(days=61 + 90)


def test_ca_rotation_trusts_both_cas_until_the_old_one_expires() -> None:
    validity = Validity(days=100, ca_days=365, renew_before_days=2)
    start = datetime(2030, 1, 1, tzinfo=UTC)
    first = issued_at(start, validity)
    old_ca = x509.load_pem_x509_certificate(first.ca_bundle)
    old_cert = x509.load_pem_x509_certificate(first.tls_crt)

    # 270 days in, the CA has 95 days left: less than a new 100-day serving certificate.
    rotated = reconcile(first, NAMES, validity, start + timedelta(days=270))

    assert rotated.changes and "new CA" in rotated.changes[0]
    new_ca, kept = x509.load_pem_x509_certificates(rotated.material.ca_bundle)
    assert kept == old_ca and new_ca != old_ca
    x509.load_pem_x509_certificate(rotated.material.tls_crt).verify_directly_issued_by(new_ca)
    old_cert.verify_directly_issued_by(kept)  # servers not yet reloaded still verify

    # The old CA is gone; the serving certificate (until day 370) is not due yet.
    after_expiry = start + timedelta(days=366)
    pruned = reconcile(rotated.material, NAMES, validity, after_expiry)
    assert pruned.changes == ("dropped 1 expired CA",)
    assert x509.load_pem_x509_certificates(pruned.material.ca_bundle) == [new_ca]
    assert reconcile(pruned.material, NAMES, validity, after_expiry).changes == ()


def test_a_new_ca_is_in_place_before_the_certificate_it_signed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client reading ca.crt must trust the new CA before the server can present its
    certificate."""
    # Issued 300 days ago with a 366-day CA: a new 365-day certificate would outlive it.
    old = issued_at(datetime.now(UTC) - timedelta(days=300), Validity(days=365, ca_days=366))
    write_dir(str(tmp_path), old)
    renamed: list[str] = []
    rename = os.replace

    def recording(source: str, target: str) -> None:
        renamed.append(os.path.basename(target))
        rename(source, target)

    monkeypatch.setattr(os, "replace", recording)

    assert certs("--out-dir", str(tmp_path)) == 0

    assert sorted(renamed[:2]) == ["ca.crt", "ca.key"]
    assert sorted(renamed[2:]) == ["tls.crt", "tls.key"]


def test_a_renewal_drops_the_expired_ca_from_the_bundle() -> None:
    validity = Validity(days=100, ca_days=365, renew_before_days=2)
    start = datetime(2030, 1, 1, tzinfo=UTC)
    rotated = reconcile(issued_at(start, validity), NAMES, validity, start + timedelta(days=270))
    new_ca = x509.load_pem_x509_certificates(rotated.material.ca_bundle)[0]

    # Day 369: the old CA expired on day 365, the serving certificate expires on day 370.
    renewed = reconcile(rotated.material, NAMES, validity, start + timedelta(days=369))

    assert renewed.changes and "renewed the serving certificate" in renewed.changes[0]
    assert x509.load_pem_x509_certificates(renewed.material.ca_bundle) == [new_ca]


def test_a_new_ca_does_not_carry_an_expired_one() -> None:
    validity = Validity(days=100, ca_days=365, renew_before_days=2)
    start = datetime(2030, 1, 1, tzinfo=UTC)
    first = issued_at(start, validity)

    # Nobody ran the command for more than a year: the CA has expired.
    plan = reconcile(first, NAMES, validity, start + timedelta(days=400))

    assert plan.changes and "new CA" in plan.changes[0]
    (ca,) = x509.load_pem_x509_certificates(plan.material.ca_bundle)
    assert ca != x509.load_pem_x509_certificate(first.ca_bundle)


# --- settings -------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["certs", *argv])


def test_settings_come_from_flags_else_environment() -> None:
    environ = {"LOCUST_WEBHOOK_DAYS": "40", "LOCUST_WEBHOOK_OUT_DIR": "from-env"}
    settings = certs_settings(parse("--out-dir", "certs"), environ)
    assert settings.out_dir == "certs"
    assert settings.validity.days == 40


def test_a_ca_lasting_exactly_twice_the_certificate_is_accepted() -> None:
    settings = certs_settings(parse("--out-dir", "x", "--days", "365", "--ca-days", "730"), {})
    assert settings.validity == Validity(days=365, ca_days=730, renew_before_days=30)


EITHER = (
    r"either --out-dir \(LOCUST_WEBHOOK_OUT_DIR\), or --secret \(LOCUST_WEBHOOK_SECRET\) "
    r"and --webhook-config \(LOCUST_WEBHOOK_WEBHOOK_CONFIG\)"
)
TWICE = (
    r"--ca-days \(LOCUST_WEBHOOK_CA_DAYS\) must be at least twice "
    r"--days \(LOCUST_WEBHOOK_DAYS\)"
)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), EITHER),
        (("--out-dir", "x", "--secret", "s", "--webhook-config", "w"), EITHER),
        (
            ("--secret", "s"),
            r"--secret \(LOCUST_WEBHOOK_SECRET\) and --webhook-config "
            r"\(LOCUST_WEBHOOK_WEBHOOK_CONFIG\) go together",
        ),
        (
            ("--out-dir", "x", "--days", "30", "--renew-before-days", "30"),
            r"--renew-before-days \(LOCUST_WEBHOOK_RENEW_BEFORE_DAYS\) must be less than "
            r"--days \(LOCUST_WEBHOOK_DAYS\)",
        ),
        (("--out-dir", "x", "--days", "400", "--ca-days", "365"), TWICE),
        (("--out-dir", "x", "--days", "365", "--ca-days", "366"), TWICE),
        (("--out-dir", "x", "--days", "soon"), "LOCUST_WEBHOOK_DAYS"),
        (("--out-dir", "x", "--renew-before-days", "0"), "between 1 and 36500"),
        (("--out-dir", "x", "--ca-days", "36501"), "between 1 and 36500"),
        (("--out-dir", "x", "--service", "Not_A_Name"), "DNS label"),
        (("--out-dir", "x", "--service", "webhook\n"), "DNS label"),
        (("--secret", "tls\n", "--webhook-config", "w"), "object name"),
        (("--secret", "tls", "--webhook-config", "Webhook"), "LOCUST_WEBHOOK_WEBHOOK_CONFIG"),
    ],
)
def test_bad_settings_are_refused_with_the_flag_named(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(SettingError, match=message):
        certs_settings(parse(*argv), {})


# --- cluster --------------------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    """A fake API server holding the deploy/ webhook configuration, and a kubeconfig for it."""
    config = yaml.safe_load((ROOT / "deploy/base/mutatingwebhookconfiguration.yaml").read_text())
    # A second webhook shows that every entry gets the bundle.
    second = {**copy.deepcopy(config["webhooks"][0]), "name": "second.locust-webhook.locust.io"}
    config["webhooks"].append(second)
    with serve(tmp_path) as (fake, kubeconfig):
        fake.put("mutatingwebhookconfigurations", "", config)
        yield fake, kubeconfig


def in_cluster(kubeconfig: Path) -> int:
    return certs(
        "--secret",
        "locust-webhook-tls",
        "--webhook-config",
        "locust-webhook",
        "--kubeconfig",
        str(kubeconfig),
    )


def ca_bundles(fake: FakeCluster) -> list[bytes]:
    config = fake.get(*CONFIG)
    assert config is not None
    return [base64.b64decode(w["clientConfig"]["caBundle"]) for w in config["webhooks"]]


def test_creates_the_secret_and_patches_every_ca_bundle(cluster: Any) -> None:
    fake, kubeconfig = cluster

    assert in_cluster(kubeconfig) == 0

    secret = fake.get(*SECRET)
    assert secret is not None and secret["type"] == "kubernetes.io/tls"
    assert {"tls.crt", "tls.key", "ca.crt"} <= set(secret["data"])
    material = material_from_secret(secret)
    assert material is not None
    assert ca_bundles(fake) == [material.ca_bundle, material.ca_bundle]
    cert = x509.load_pem_x509_certificate(material.tls_crt)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(material.ca_bundle))
    assert subject_alternative_names(cert) == SERVICE_NAMES
    patches = [r for r in fake.writes if r.method == "PATCH"]
    assert [p.content_type for p in patches] == ["application/json-patch+json"]


def test_second_run_writes_nothing(cluster: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake, kubeconfig = cluster
    assert in_cluster(kubeconfig) == 0
    fake.requests.clear()
    capsys.readouterr()

    assert in_cluster(kubeconfig) == 0

    assert fake.requests, "the second run read the objects"
    assert fake.writes == []
    out = capsys.readouterr().out
    assert "already up to date" in out


def test_ca_rotation_publishes_both_cas_before_the_new_certificate(cluster: Any) -> None:
    fake, kubeconfig = cluster
    # Issued 300 days ago with a 365-day CA: a new 365-day certificate would outlive it.
    old = issued_at(datetime.now(UTC) - timedelta(days=300), Validity(days=365, ca_days=365 + 1))
    fake.put(
        "secrets",
        "locust-webhook",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "locust-webhook-tls", "annotations": {"kept": "yes"}},
            "type": "kubernetes.io/tls",
            "data": secret_data(old),
        },
    )
    config = fake.get(*CONFIG)
    assert config is not None
    for webhook in config["webhooks"]:  # as the run that issued `old` left it
        webhook["clientConfig"]["caBundle"] = base64.b64encode(old.ca_bundle).decode()
    fake.put("mutatingwebhookconfigurations", "", config)

    assert in_cluster(kubeconfig) == 0

    secret = fake.get(*SECRET)
    assert secret is not None and secret["metadata"]["annotations"] == {"kept": "yes"}
    new = material_from_secret(secret)
    assert new is not None
    new_ca, old_ca = x509.load_pem_x509_certificates(new.ca_bundle)
    assert old_ca == x509.load_pem_x509_certificate(old.ca_bundle)
    x509.load_pem_x509_certificate(new.tls_crt).verify_directly_issued_by(new_ca)
    assert ca_bundles(fake) == [new.ca_bundle, new.ca_bundle]
    writes = [(r.method, r.path.rsplit("/", 2)[-2]) for r in fake.writes]
    assert writes == [("PATCH", "mutatingwebhookconfigurations"), ("PUT", "secrets")]


def test_a_deleted_secret_is_reissued_while_its_ca_stays_trusted(cluster: Any) -> None:
    """The admin deletes the Secret to force new certificates; the pods serve the files they
    mounted until the kubelet refreshes them, so the API server must still trust their CA."""
    fake, kubeconfig = cluster
    assert in_cluster(kubeconfig) == 0
    served = material_from_secret(fake.get(*SECRET))
    assert served is not None
    with fake.lock:
        del fake.objects[SECRET]

    assert in_cluster(kubeconfig) == 0

    new = material_from_secret(fake.get(*SECRET))
    assert new is not None and new.ca_key != served.ca_key
    new_ca, old_ca = x509.load_pem_x509_certificates(new.ca_bundle)
    assert old_ca == x509.load_pem_x509_certificate(served.ca_bundle)
    x509.load_pem_x509_certificate(served.tls_crt).verify_directly_issued_by(old_ca)
    x509.load_pem_x509_certificate(new.tls_crt).verify_directly_issued_by(new_ca)
    assert ca_bundles(fake) == [new.ca_bundle, new.ca_bundle]


def issued_then_second_bundle_stale(fake: Any, kubeconfig: Path) -> dict[str, Any]:
    """A first run, then the second webhook's caBundle changed behind it; the configuration."""
    assert in_cluster(kubeconfig) == 0
    config = fake.get(*CONFIG)
    assert config is not None
    config["webhooks"][1]["clientConfig"]["caBundle"] = base64.b64encode(b"stale").decode()
    fake.put("mutatingwebhookconfigurations", "", config)
    return config


def test_ca_bundle_is_patched_only_where_it_differs(cluster: Any) -> None:
    fake, kubeconfig = cluster
    issued_then_second_bundle_stale(fake, kubeconfig)
    fake.requests.clear()

    assert in_cluster(kubeconfig) == 0

    (patch,) = fake.writes
    assert [op["path"] for op in patch.body if op["op"] == "add"] == [
        "/webhooks/1/clientConfig/caBundle"
    ]
    assert ca_bundles(fake)[0] == ca_bundles(fake)[1]


def test_a_concurrent_writer_makes_the_run_start_over(cluster: Any) -> None:
    fake, kubeconfig = cluster
    old = issued_at(datetime.now(UTC) - timedelta(days=400), Validity(days=365, ca_days=3650))
    fake.put(
        "secrets", "locust-webhook", {"metadata": {"name": SECRET[2]}, "data": secret_data(old)}
    )

    def another_writer_first(request: Request) -> None:
        if request.method == "PUT" and fake.before_write is not None:
            fake.before_write = None
            stored = fake.objects[SECRET]
            fake.store("secrets", "locust-webhook", {**stored, "data": secret_data(old)})

    fake.before_write = another_writer_first

    assert in_cluster(kubeconfig) == 0

    assert [r.method for r in fake.writes if "secrets" in r.path] == ["PUT", "PUT"]
    secret = fake.get(*SECRET)
    assert secret is not None
    material = material_from_secret(secret)
    assert material is not None and material.tls_crt != old.tls_crt


def test_a_webhook_list_edited_meanwhile_is_not_patched_by_position(cluster: Any) -> None:
    fake, kubeconfig = cluster
    config = issued_then_second_bundle_stale(fake, kubeconfig)
    added = {**copy.deepcopy(config["webhooks"][0]), "name": "added.locust-webhook.locust.io"}

    def another_writer_first(request: Request) -> None:
        if request.method == "PATCH" and fake.before_write is not None:
            fake.before_write = None
            stored = fake.objects[CONFIG]
            fake.store(CONFIG[0], "", {**stored, "webhooks": [added, *stored["webhooks"]]})

    fake.before_write = another_writer_first

    # The patch's test of webhooks/1's name fails (the API server refuses it): the run fails
    # instead of setting caBundle on the webhook that moved there and leaving `second` stale.
    assert in_cluster(kubeconfig) == 1

    stored = fake.get(*CONFIG)
    assert stored is not None
    assert [w["name"] for w in stored["webhooks"]][1:] == [w["name"] for w in config["webhooks"]]
    assert base64.b64decode(stored["webhooks"][2]["clientConfig"]["caBundle"]) == b"stale"


def test_the_run_starts_over_after_each_of_two_conflicts(cluster: Any) -> None:
    fake, kubeconfig = cluster
    old = issued_at(datetime.now(UTC) - timedelta(days=400), Validity(days=365, ca_days=3650))
    fake.put(
        "secrets", "locust-webhook", {"metadata": {"name": SECRET[2]}, "data": secret_data(old)}
    )
    conflicts = [2]

    def another_writer_first(request: Request) -> None:
        if request.method == "PUT" and conflicts[0]:
            conflicts[0] -= 1
            stored = fake.objects[SECRET]
            fake.store("secrets", "locust-webhook", {**stored, "data": secret_data(old)})

    fake.before_write = another_writer_first

    assert in_cluster(kubeconfig) == 0

    assert [r.method for r in fake.writes if "secrets" in r.path] == ["PUT", "PUT", "PUT"]
    material = material_from_secret(fake.get(*SECRET) or {})
    assert material is not None and material.tls_crt != old.tls_crt


def test_a_missing_webhook_configuration_fails_without_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve(tmp_path) as (fake, kubeconfig):
        assert in_cluster(kubeconfig) == 1
        assert fake.writes == []
        # Only a conflict is worth starting over for.
        assert len([r for r in fake.requests if "mutatingwebhookconfigurations" in r.path]) == 1
    assert "404" in capsys.readouterr().err


def test_a_kubeconfig_that_does_not_exist_is_refused_naming_the_flag(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    with pytest.raises(SettingError, match=rf"--kubeconfig .*: no kubeconfig at {missing}$"):
        certs("--secret", "tls", "--webhook-config", "w", "--kubeconfig", str(missing))


def test_an_unreachable_api_fails_naming_its_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as held:  # a port nothing listens on: connections are refused
        held.bind(("127.0.0.1", 0))
        server = f"https://127.0.0.1:{held.getsockname()[1]}"
        kubeconfig = tmp_path / "config"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": server}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        assert (
            certs("--secret", "tls", "--webhook-config", "w", "--kubeconfig", str(kubeconfig)) == 1
        )
    assert f"cannot reach the Kubernetes API at {server}: " in capsys.readouterr().err
