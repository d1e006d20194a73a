"""Operator-shaped objects for tests, written after the locust-k8s-operator's samples.

Pods look the way the Job controller submits them: `generateName`, no `name`, no namespace in
the object (the namespace comes with the request), labels of the operator and of the Job.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

# The image a LocustTest with OpenTelemetry needs: locustio/locust lacks the SDK (locust[otel]).
OPERATOR_IMAGE = "locustio/locust-otel:2.47.0"


def locusttest(
    name: str,
    namespace: str = "default",
    *,
    otel: dict[str, Any] | None = None,
    version: str = "v2",
    annotations: dict[str, str] | None = None,
    master_command: str = "--locustfile /lotest/src/locustfile.py",
) -> dict[str, Any]:
    """A LocustTest like the operator's samples (v2 unless asked; v1 has no observability)."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "resourceVersion": "1"}
    if annotations:
        metadata["annotations"] = annotations
    if version == "v1":
        return {
            "apiVersion": "locust.io/v1",
            "kind": "LocustTest",
            "metadata": metadata,
            "spec": {
                "masterCommandSeed": master_command,
                "workerCommandSeed": "--locustfile /lotest/src/locustfile.py",
                "workerReplicas": 2,
                "image": OPERATOR_IMAGE,
                "configMap": f"{name}-configmap",
            },
        }
    spec: dict[str, Any] = {
        "image": OPERATOR_IMAGE,
        "master": {"command": master_command},
        "worker": {"command": "--locustfile /lotest/src/locustfile.py", "replicas": 2},
        "testFiles": {"configMapRef": f"{name}-scripts"},
    }
    if otel is not None:
        spec["observability"] = {"openTelemetry": otel}
    return {"apiVersion": "locust.io/v2", "kind": "LocustTest", "metadata": metadata, "spec": spec}


def operator_pod(
    test_name: str,
    role: str,
    *,
    extra_args: list[str] | None = None,
    env: list[dict[str, Any]] | None = None,
    annotations: dict[str, str] | None = None,
    with_exporter: bool = False,
    workers: int = 2,
    command: list[str] | None = None,
    image: str = OPERATOR_IMAGE,
    config_map: str | None = None,
) -> dict[str, Any]:
    """A master or worker pod as the Job controller sends it for the operator's Job. `command`
    is the LocustTest's command for the role (default: the samples' `--locustfile`)."""
    base = test_name.replace(".", "-")
    pod_name = f"{base}-{role}"
    args = [*(command or ["--locustfile", "/lotest/src/locustfile.py"]), *(extra_args or [])]
    if role == "master":
        args += [
            "--master",
            "--master-port=5557",
            f"--expect-workers={workers}",
            "--autostart",
            "--autoquit",
            "60",
            "--enable-rebalancing",
            "--only-summary",
        ]
        ports = [
            {"containerPort": 5557, "name": "master-p1", "protocol": "TCP"},
            {"containerPort": 5558, "name": "master-p2", "protocol": "TCP"},
            {"containerPort": 8089, "name": "master-p3", "protocol": "TCP"},
        ]
    else:
        args += ["--worker", "--master-port=5557", f"--master-host={base}-master"]
        ports = [{"containerPort": 8080, "name": "worker-p1", "protocol": "TCP"}]
    container: dict[str, Any] = {
        "name": pod_name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "ports": ports,
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "volumeMounts": [{"mountPath": "/lotest/src/", "name": f"{base}-{role}-locustfile"}],
    }
    if env is not None:
        container["env"] = env
    containers = [container]
    if with_exporter:
        containers.append(
            {
                "name": "locust-metrics-exporter",
                "image": "containersol/locust_exporter:v0.5.0",
                "env": [
                    {"name": "LOCUST_EXPORTER_URI", "value": "http://localhost:8089"},
                    {"name": "LOCUST_EXPORTER_WEB_LISTEN_ADDRESS", "value": ":9646"},
                ],
                "ports": [{"containerPort": 9646, "name": "locust-metrics", "protocol": "TCP"}],
                "resources": {},
            }
        )
    labels = {
        "app": pod_name,
        "managed-by": "locust-k8s-operator",
        "performance-test-name": test_name,
        "performance-test-pod-name": pod_name,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": job_pod_metadata(pod_name, labels, annotations),
        "spec": {
            "containers": containers,
            "restartPolicy": "Never",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "terminationGracePeriodSeconds": 30,
            "securityContext": {},
            "volumes": [
                {
                    "name": f"{base}-{role}-locustfile",
                    "configMap": {
                        "name": config_map or f"{test_name}-scripts",
                        "defaultMode": 420,
                    },
                }
            ],
        },
        "status": {},
    }


def job_pod_metadata(
    job: str, labels: dict[str, str], annotations: dict[str, str] | None
) -> dict[str, Any]:
    """A pod's metadata as the Job controller submits it for the Job `job`: generateName, the
    Job's labels added to the template's, and the Job as its controlling owner."""
    job_uid = str(uuid.uuid5(uuid.NAMESPACE_DNS, job))
    metadata: dict[str, Any] = {
        "generateName": f"{job}-",
        "labels": {
            **labels,
            "batch.kubernetes.io/controller-uid": job_uid,
            "batch.kubernetes.io/job-name": job,
            "controller-uid": job_uid,
            "job-name": job,
        },
        "ownerReferences": [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": job,
                "uid": job_uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if annotations:
        metadata["annotations"] = dict(annotations)
    return metadata


def review(
    pod: dict[str, Any],
    namespace: str = "default",
    *,
    uid: str | None = None,
    api_version: str = "admission.k8s.io/v1",
    operation: str = "CREATE",
    dry_run: bool = False,
) -> dict[str, Any]:
    """An AdmissionReview as the API server sends it for a pod CREATE."""
    return {
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "request": {
            "uid": uid or str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "",
            "namespace": namespace,
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:job-controller",
                "uid": "2b1c3d4e-0000-4000-8000-000000000001",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": copy.deepcopy(pod),
            "oldObject": None,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


# The Kafka variables the Go (v2) operator puts first on every Locust container; empty values
# are omitted from the JSON, as Go's omitempty does.
V2_KAFKA_ENV = [
    {"name": "KAFKA_BOOTSTRAP_SERVERS", "value": "localhost:9092"},
    {"name": "KAFKA_SECURITY_ENABLED", "value": "false"},
    {"name": "KAFKA_SECURITY_PROTOCOL_CONFIG", "value": "SASL_PLAINTEXT"},
    {"name": "KAFKA_SASL_MECHANISM", "value": "SCRAM-SHA-512"},
    {"name": "KAFKA_SASL_JAAS_CONFIG"},
    {"name": "KAFKA_USERNAME"},
    {"name": "KAFKA_PASSWORD"},
]


def v2_operator_pod(test: dict[str, Any], role: str) -> dict[str, Any]:
    """The pod of the Job the v2 (Go) locust-k8s-operator builds for a v2 LocustTest, as the
    Job controller submits it: the operator's own labels and annotations (the role's added),
    its command with `--otel` before the mode flag when OpenTelemetry is on, unnamed ports, the
    Kafka, OTel and user variables, and on the master without OpenTelemetry the exporter as a
    native sidecar with the scrape annotations."""
    name, spec = test["metadata"]["name"], test["spec"]
    node = f"{name.replace('.', '-')}-{role}"
    otel = ((spec.get("observability") or {}).get("openTelemetry") or {}).get("enabled") is True
    settings = spec["observability"]["openTelemetry"] if otel else {}
    role_spec = spec[role]
    words = str(role_spec.get("command", "")).split() + (["--otel"] if otel else [])
    if role == "master":
        words += ["--master", "--master-port=5557"]
        words += [f"--expect-workers={spec['worker'].get('replicas', 1)}", "--autostart"]
        words += ["--autoquit", "60", "--enable-rebalancing", "--only-summary"]
        ports = [{"containerPort": port, "protocol": "TCP"} for port in (5557, 5558, 8089)]
    else:
        words += ["--worker", "--master-port=5557", f"--master-host={name}-master"]
        ports = [{"containerPort": 8080, "protocol": "TCP"}]
    env = [dict(entry) for entry in V2_KAFKA_ENV]
    if otel:
        env += [{"name": "OTEL_TRACES_EXPORTER", "value": "otlp"}]
        env += [{"name": "OTEL_METRICS_EXPORTER", "value": "otlp"}]
        if settings.get("endpoint"):
            env.append({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": settings["endpoint"]})
        protocol = settings.get("protocol") or "grpc"
        env.append({"name": "OTEL_EXPORTER_OTLP_PROTOCOL", "value": protocol})
        if settings.get("insecure"):
            env.append({"name": "OTEL_EXPORTER_OTLP_INSECURE", "value": "true"})
        extra = settings.get("extraEnvVars") or {}
        env += [{"name": key, "value": extra[key]} for key in sorted(extra)]
    env += [dict(entry) for entry in (spec.get("env") or {}).get("variables", ())]
    container = {
        "name": node,
        "image": spec["image"],
        "imagePullPolicy": spec.get("imagePullPolicy", "IfNotPresent"),
        "args": words,
        "ports": ports,
        "env": env,
        "resources": {},
        "volumeMounts": [{"name": node, "mountPath": "/lotest/src"}],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }
    annotations: dict[str, str] = {}
    init_containers = []
    if role == "master" and not otel:
        annotations = {
            "prometheus.io/scrape": "true",
            "prometheus.io/path": "/metrics",
            "prometheus.io/port": "9646",
        }
        init_containers.append(
            {
                "name": "locust-metrics-exporter",
                "image": "containersol/locust_exporter:v0.5.0",
                "imagePullPolicy": "IfNotPresent",
                "restartPolicy": "Always",
                "ports": [{"containerPort": 9646, "protocol": "TCP"}],
                "env": [
                    {"name": "LOCUST_EXPORTER_URI", "value": "http://localhost:8089"},
                    {"name": "LOCUST_EXPORTER_WEB_LISTEN_ADDRESS", "value": ":9646"},
                ],
                "resources": {},
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                    "readOnlyRootFilesystem": True,
                },
            }
        )
    annotations.update(role_spec.get("annotations") or {})
    labels = {"app": name, "performance-test-pod-name": node, "managed-by": "locust-k8s-operator"}
    labels |= {"performance-test-name": name, **(role_spec.get("labels") or {})}
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "restartPolicy": "Never",
        "volumes": [{"name": node, "configMap": {"name": spec["testFiles"]["configMapRef"]}}],
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    metadata = job_pod_metadata(node, labels, annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
