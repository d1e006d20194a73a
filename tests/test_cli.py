"""The command line: settings (flags, environment twins, defaults, errors) and `inject`."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from conftest import cli, parse_serve
from cryptography.hazmat.primitives import serialization
from fixtures import locusttest, operator_pod
from server_process import make_certs

from webhook.certs import CERTS_OPTIONS
from webhook.config import (
    MUTATION_OPTIONS,
    SERVE_OPTIONS,
    MutationSettings,
    ServeSettings,
    SettingError,
    serve_settings,
)
from webhook.handler import Handler
from webhook.lookup import DirectorySource
from webhook.server import check_address


def test_documented_defaults_are_the_settings_defaults() -> None:
    documented = {o.attr: o.parse(o.default) for o in (*SERVE_OPTIONS, *MUTATION_OPTIONS)}
    actual: dict[str, Any] = {
        f.name: getattr(ServeSettings(), f.name) for f in fields(ServeSettings)
    }
    actual.update({f.name: getattr(MutationSettings(), f.name) for f in fields(MutationSettings)})
    actual.pop("mutation")
    assert documented == actual


def test_flag_beats_environment_beats_default(cert_args: list[str]) -> None:
    env = {"LOCUST_WEBHOOK_PORT": "9443", "LOCUST_WEBHOOK_SIDECAR_MODE": "container"}
    settings = serve_settings(parse_serve([*cert_args, "--port", "10443"]), env)
    assert settings.port == 10443
    assert settings.mutation.sidecar_mode == "container"
    assert settings.workers == 2


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--port", "http"], {}, "--port (LOCUST_WEBHOOK_PORT)"),
        ([], {"LOCUST_WEBHOOK_PORT": "70000"}, "LOCUST_WEBHOOK_PORT"),
        (["--failure-policy", "maybe"], {}, "--failure-policy"),
        (["--sidecar-mode", "sidecar"], {}, "--sidecar-mode"),
        (["--exporter-memory-limit", "lots"], {}, "--exporter-memory-limit"),
        (
            [],
            {"LOCUST_WEBHOOK_RESOURCE_ATTRIBUTES": "perhaps"},
            "LOCUST_WEBHOOK_RESOURCE_ATTRIBUTES",
        ),
        (["--namespaces", "Bad_Name"], {}, "--namespaces"),
        (["--locusttests", "/nonexistent/dir"], {}, "--locusttests"),
        (["--lookup-timeout", "-1"], {}, "--lookup-timeout"),
    ],
)
def test_bad_settings_name_the_setting(
    cert_args: list[str], argv: list[str], env: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingError, match=named.replace("(", r"\(").replace(")", r"\)")):
        serve_settings(parse_serve([*cert_args, *argv]), env)


def test_serve_refuses_to_start_without_certificates(tmp_path: Path) -> None:
    done = cli(
        "serve", "--cert-file", str(tmp_path / "none.crt"), "--key-file", str(tmp_path / "none.key")
    )
    assert done.returncode == 2
    assert "--cert-file (LOCUST_WEBHOOK_CERT_FILE)" in done.stderr
    assert "does not exist" in done.stderr
    assert "`make certs`" not in done.stderr  # it writes the default paths, not these
    default = cli("serve", cwd=tmp_path)
    assert default.returncode == 2
    assert "'certs/tls.crt' does not exist (`make certs` writes" in default.stderr


@pytest.mark.parametrize("reuse_port", [False, True], ids=["another program", "another serve"])
def test_serve_refuses_a_port_already_listened_on(tmp_path: Path, reuse_port: bool) -> None:
    """A port held without SO_REUSEPORT made the workers fail and restart forever; one held
    by another `serve` (whose workers set it) was shared with it without a word."""
    make_certs(tmp_path)
    with socket.socket() as holder:
        if reuse_port:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = cli(
            "serve", "--cert-file", str(tmp_path / "tls.crt"), "--key-file",
            str(tmp_path / "tls.key"), "--host", "127.0.0.1", "--port", str(port),
            "--locusttests", str(tmp_path),
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert (
        "--host (LOCUST_WEBHOOK_HOST)/--port (LOCUST_WEBHOOK_PORT): cannot listen on 127.0.0.1 "
        f"port {port}: Address already in use"
    ) in done.stderr


def test_a_port_left_with_connections_in_time_wait_can_be_listened_on_again() -> None:
    with socket.socket() as listener:
        for option in (socket.SO_REUSEADDR, socket.SO_REUSEPORT):  # as gunicorn's workers
            listener.setsockopt(socket.SOL_SOCKET, option, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server's side closes first: its end waits in TIME_WAIT
            client.recv(1)
    check_address("127.0.0.1", port)  # raises SettingError when refused
    with pytest.raises(SettingError, match=r"cannot listen on 192\.0\.2\.1 port"):
        check_address("192.0.2.1", port)  # TEST-NET-1: no interface has it


def test_an_unknown_flag_is_refused_with_the_commands_own_usage() -> None:
    done = cli("serve", "--prot", "8443")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: locust-webhook serve ")
    assert "locust-webhook serve: error: unrecognized arguments: --prot 8443" in done.stderr


def test_serve_refuses_a_key_that_does_not_match(tmp_path: Path) -> None:
    for name in ("one", "two"):
        make_certs(tmp_path / name)
    done = cli(
        "serve",
        "--cert-file",
        str(tmp_path / "one" / "tls.crt"),
        "--key-file",
        str(tmp_path / "two" / "tls.key"),
        "--locusttests",
        str(tmp_path),
    )
    assert done.returncode == 2
    assert "--key-file (LOCUST_WEBHOOK_KEY_FILE)" in done.stderr
    assert "is not the key of" in done.stderr


def _encrypted(key_pem: bytes, form: serialization.PrivateFormat) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM, form, serialization.BestAvailableEncryption(b"secret")
    )


@pytest.mark.parametrize(
    ("key", "said"),
    [
        (
            lambda d: _encrypted((d / "tls.key").read_bytes(), serialization.PrivateFormat.PKCS8),
            "the private key in {key} is encrypted (serve needs an unencrypted key)",
        ),
        (
            lambda d: _encrypted(
                (d / "tls.key").read_bytes(), serialization.PrivateFormat.TraditionalOpenSSL
            ),
            "the private key in {key} is encrypted (serve needs an unencrypted key)",
        ),
        (lambda d: (d / "tls.crt").read_bytes(), "{key} holds no PEM private key"),
        (lambda d: b"", "{key} holds no PEM private key"),
    ],
    ids=["encrypted PKCS#8", "encrypted traditional", "a certificate", "empty"],
)
def test_serve_says_what_is_wrong_with_a_key_it_cannot_use(
    tmp_path: Path, key: Callable[[Path], bytes], said: str
) -> None:
    """Not OpenSSL's `PEM lib`, nor its pass phrase prompt (which blocks on a terminal)."""
    make_certs(tmp_path)
    key_file = tmp_path / "other.key"
    key_file.write_bytes(key(tmp_path))
    done = cli(
        "serve", "--cert-file", str(tmp_path / "tls.crt"), "--key-file", str(key_file),
        "--locusttests", str(tmp_path), stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert said.format(key=key_file) in done.stderr
    assert "PEM lib" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("flag", ["--cert-file", "--key-file"])
def test_serve_says_a_directory_given_as_a_file_is_not_a_file(tmp_path: Path, flag: str) -> None:
    make_certs(tmp_path)
    args = {"--cert-file": str(tmp_path / "tls.crt"), "--key-file": str(tmp_path / "tls.key")}
    args[flag] = str(tmp_path)
    with pytest.raises(SettingError, match=rf"{flag} .*: '{tmp_path}' is not a file$"):
        serve_settings(parse_serve([x for pair in args.items() for x in pair]), {})


@pytest.mark.parametrize(
    ("env", "said"),
    [
        # Neither a cluster nor a kubeconfig: say what to set.
        (
            {"KUBECONFIG": "/nonexistent/kubeconfig"},
            [
                "--locusttests (LOCUST_WEBHOOK_LOCUSTTESTS) is empty",
                "no Kubernetes API configuration",
                "KUBECONFIG",
            ],
        ),
        # In a pod whose configuration is broken: say why it cannot be used.
        (
            {"KUBERNETES_SERVICE_HOST": "10.0.0.1"},
            ["in-cluster configuration", "host/port is not set"],
        ),
        # A kubeconfig the client cannot read: why, without a traceback or the file's secrets.
        (
            {"KUBECONFIG": "{tmp_path}/not-yaml", "KUBERNETES_SERVICE_HOST": ""},
            ["cannot use kubeconfig", "not-yaml: yaml.parser.ParserError: while parsing"],
        ),
        (
            {"KUBECONFIG": "{tmp_path}/bad-ca", "KUBERNETES_SERVICE_HOST": ""},
            ["cannot use kubeconfig", "bad-ca: binascii.Error: Incorrect padding"],
        ),
        # The watcher's socket path is longer than a Unix socket's: blame the socket.
        (
            {"TMPDIR": "{tmp_path}/" + "t" * 120},
            [
                "cannot watch LocustTests in the cluster (--locusttests",
                "cannot listen on the feed socket",
                "AF_UNIX path too long",
            ],
        ),
    ],
    ids=[
        "no cluster, no directory",
        "broken in-cluster configuration",
        "kubeconfig not YAML",
        "kubeconfig CA not base64",
        "socket path too long",
    ],
)
def test_serve_without_a_usable_cluster_says_why(
    tmp_path: Path, env: dict[str, str], said: list[str]
) -> None:
    make_certs(tmp_path)
    env = {name: value.format(tmp_path=tmp_path) for name, value in env.items()}
    if "TMPDIR" in env:
        Path(env["TMPDIR"]).mkdir()
    (tmp_path / "not-yaml").write_text("clusters: [\n  - {name: x, token: SECRET-TOKEN\n")
    (tmp_path / "bad-ca").write_text(BAD_CA_KUBECONFIG)
    done = cli(
        "serve",
        "--cert-file",
        str(tmp_path / "tls.crt"),
        "--key-file",
        str(tmp_path / "tls.key"),
        env={"HOME": str(tmp_path), **env},
    )
    assert done.returncode == 2
    for words in said:
        assert words in done.stderr
    assert "Traceback" not in done.stderr and "SECRET-TOKEN" not in done.stderr


BAD_CA_KUBECONFIG = """
apiVersion: v1
kind: Config
current-context: c
clusters:
- name: x
  cluster: {server: "https://127.0.0.1:1", certificate-authority-data: "abc"}
contexts:
- name: c
  context: {cluster: x, user: u}
users:
- name: u
  user: {token: SECRET-TOKEN}
"""


def test_help_shows_every_setting_with_env_and_default() -> None:
    done = cli("serve", "--help", env={"COLUMNS": "400", "PATH": ""})
    assert done.returncode == 0
    for option in (*SERVE_OPTIONS, *MUTATION_OPTIONS):
        assert option.flag in done.stdout
        assert f"env {option.env}" in done.stdout


def run_inject(
    tmp_path: Path, obj: dict[str, Any], test: dict[str, Any], *args: str
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "obj.yaml").write_text(yaml.safe_dump(obj))
    (tmp_path / "lt.yaml").write_text(yaml.safe_dump(test))
    return cli(
        "inject", "-f", str(tmp_path / "obj.yaml"), "--locusttest", str(tmp_path / "lt.yaml"), *args
    )


def test_inject_prints_the_mutated_pod(tmp_path: Path) -> None:
    test = locusttest("demo", otel={"enabled": True, "endpoint": "otel:4317"})
    done = run_inject(tmp_path, operator_pod("demo", "worker"), test)
    assert done.returncode == 0, done.stderr
    pod = yaml.safe_load(done.stdout)
    assert "--otel" in pod["spec"]["containers"][0]["args"]
    assert "no scheme" in done.stderr


def test_inject_patch_applies_to_the_input(tmp_path: Path) -> None:
    pod = operator_pod("demo", "master")
    done = run_inject(tmp_path, pod, locusttest("demo"), "-o", "patch")
    assert done.returncode == 0, done.stderr
    patched = jsonpatch.JsonPatch(json.loads(done.stdout)).apply(pod)
    assert patched["spec"]["initContainers"][0]["name"] == "locust-metrics-exporter"


def test_inject_a_jobs_pod_template_from_stdin(tmp_path: Path) -> None:
    pod = operator_pod("demo", "worker")
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "demo-worker"},
        "spec": {"template": {"metadata": pod["metadata"], "spec": pod["spec"]}},
    }
    (tmp_path / "lt.yaml").write_text(
        yaml.safe_dump(locusttest("demo", otel={"enabled": True, "endpoint": "http://c:4317"}))
    )
    inject = ("inject", "-f", "-", "--locusttest", str(tmp_path / "lt.yaml"))
    done = cli(*inject, "-o", "json", input=json.dumps(job))
    assert done.returncode == 0, done.stderr
    mutated = json.loads(done.stdout)
    assert mutated["kind"] == "Job"
    assert "--otel" in mutated["spec"]["template"]["spec"]["containers"][0]["args"]
    patch = cli(*inject, "-o", "patch", input=json.dumps(job))
    assert patch.returncode == 0, patch.stderr
    ops = json.loads(patch.stdout)
    assert ops and all(op["path"].startswith("/spec/template/") for op in ops)
    assert jsonpatch.JsonPatch(ops).apply(job) == mutated


def test_inject_refuses_other_kinds(tmp_path: Path) -> None:
    done = run_inject(tmp_path, {"kind": "Deployment", "metadata": {}}, locusttest("demo"))
    assert done.returncode == 2
    assert "expected a Pod or a Job, got kind 'Deployment'" in done.stderr
    done = run_inject(tmp_path, {"metadata": {}}, locusttest("demo"))
    assert "expected a Pod or a Job, got an object without a kind" in done.stderr


@pytest.mark.parametrize("metadata", [None, ["a list"]], ids=["null", "a list"])
def test_inject_says_what_is_wrong_with_a_pod_whose_metadata_is_not_an_object(
    tmp_path: Path, metadata: Any
) -> None:
    pod = {**operator_pod("demo", "worker"), "metadata": metadata}
    done = run_inject(tmp_path, pod, locusttest("demo"))
    assert done.returncode == 2
    assert "warning: the pod has no performance-test-name label;" in done.stderr
    assert "cannot inject: metadata must be an object" in done.stderr
    assert "Traceback" not in done.stderr


def test_inject_warns_when_the_label_names_another_locusttest(tmp_path: Path) -> None:
    done = run_inject(tmp_path, operator_pod("other", "worker"), locusttest("demo"))
    assert done.returncode == 0, done.stderr
    assert (
        "warning: the pod's performance-test-name label is 'other', not 'demo'; "
        "the server would not use LocustTest demo"
    ) in done.stderr


def test_inject_takes_the_v2_locusttest_of_a_name_as_the_server_does(tmp_path: Path) -> None:
    both = [
        locusttest("demo", version="v1"),
        locusttest("demo", otel={"enabled": True, "endpoint": "http://c:4317"}),
    ]
    (tmp_path / "lt.yaml").write_text(yaml.safe_dump_all(both))
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(operator_pod("demo", "worker")))
    done = cli(
        "inject", "-f", str(tmp_path / "pod.yaml"), "--locusttest", str(tmp_path / "lt.yaml")
    )
    assert done.returncode == 0, done.stderr
    assert "--otel" in yaml.safe_load(done.stdout)["spec"]["containers"][0]["args"]


def test_inject_refuses_a_locusttest_it_cannot_read(tmp_path: Path) -> None:
    broken = locusttest("demo", otel={"enabled": True, "extraEnvVars": ["A=1"]})
    done = run_inject(tmp_path, operator_pod("demo", "worker"), broken)
    assert done.returncode == 2
    assert "spec.observability.openTelemetry.extraEnvVars is not an object" in done.stderr
    assert done.stdout == ""


EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("review-*.json")))
def test_the_readme_examples_are_patched_by_make_run_as_by_inject(
    tmp_path: Path, name: str
) -> None:
    """`make run` serves examples/ and the README curls these reviews: each gets a patch, the
    one `inject` prints for its pod."""
    review = json.loads((EXAMPLES / name).read_text())
    handler = Handler(DirectorySource(EXAMPLES), MutationSettings())
    response = json.loads(handler.handle((EXAMPLES / name).read_bytes()))["response"]
    assert response["allowed"] is True and response["uid"] == review["request"]["uid"]
    (tmp_path / "pod.json").write_text(json.dumps(review["request"]["object"]))
    done = cli(
        "inject", "-f", str(tmp_path / "pod.json"), "--locusttest",
        str(EXAMPLES / "locusttests.yaml"), "-o", "patch",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(base64.b64decode(response["patch"])) == json.loads(done.stdout) != []


def test_readme_documents_every_setting_with_its_default() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = {
        line.split("|")[1].strip(): line for line in readme.splitlines() if line.startswith("| `--")
    }
    for option in (*SERVE_OPTIONS, *MUTATION_OPTIONS, *CERTS_OPTIONS):
        row = rows.get(f"`{option.flag}`")
        assert row is not None, f"{option.flag} is not in the README's configuration table"
        assert f"`{option.env}`" in row
        assert (f"`{option.default}`" if option.default else "(empty)") in row
        meaning = row.split("|")[4].strip().replace("`", "")
        assert meaning == option.help, f"{option.flag}: the README and --help differ"
