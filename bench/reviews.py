"""Request bodies and LocustTests for the benchmark, built with the tests' operator-shaped fixtures.

- the load mix: OTel master and worker pods, and exporter master pods (LocustTest without
  observability), as the Job controller sends them, with the `managedFields` the API server
  has already set when admission runs;
- the scale pods: 1, 10 and 50 containers, with and without `managedFields` (~4 KB to ~200 KB);
- LocustTest files for `serve --locusttests DIR`.

Bodies carry `PLACEHOLDER` as `request.uid`; the wrk script puts a unique uid there per request.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fixtures import locusttest, operator_pod, review  # noqa: E402

NAMESPACE = "load-tests"
PLACEHOLDER = "BENCH-UID-PLACEHOLDER"
OTEL = {
    "enabled": True,
    "endpoint": "http://otel-collector.monitoring:4317",
    "protocol": "grpc",
    "insecure": True,
    "extraEnvVars": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"},
}
# Padding per container: env vars of this size put a container at ~2 KB of JSON and ~4 KB with
# its managedFields entry, so 1/10/50 containers give ~4/40/200 KB.
ENV_PER_CONTAINER = 22


def load_locusttests(per_kind: int = 10) -> list[dict[str, Any]]:
    """`otel-<i>` (OpenTelemetry on) and `plain-<i>` (no observability: exporter sidecar)."""
    tests = [locusttest(f"otel-{i}", NAMESPACE, otel=OTEL) for i in range(per_kind)]
    tests += [locusttest(f"plain-{i}", NAMESPACE) for i in range(per_kind)]
    return tests


def filler_locusttests(count: int, namespaces: int = 20) -> list[dict[str, Any]]:
    """`count` LocustTests over `namespaces` namespaces, half of them with OpenTelemetry on."""
    return [
        locusttest(
            f"scale-{i}",
            f"team-{i % namespaces}",
            otel=OTEL if i % 2 == 0 else None,
        )
        for i in range(count)
    ]


def write_locusttests(directory: Path, tests: list[dict[str, Any]], per_file: int = 100) -> None:
    """YAML files of up to `per_file` documents each (the directory source reads *.yaml)."""
    directory.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(tests), per_file):
        chunk = tests[start : start + per_file]
        path = directory / f"locusttests-{start // per_file:05d}.yaml"
        path.write_text(yaml.safe_dump_all(chunk, sort_keys=False))


def _fields_v1(value: dict[str, Any]) -> dict[str, Any]:
    """A FieldsV1 tree for `value`, the way the API server records field ownership."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            sub = _fields_v1(item)
            out[f"f:{key}"] = {".": {}, **sub} if sub else {}
        elif (
            isinstance(item, list)
            and item
            and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in item)
        ):
            keyed = {f'k:{{"name":"{i["name"]}"}}': {".": {}, **_fields_v1(i)} for i in item}
            out[f"f:{key}"] = {".": {}, **keyed}
        else:
            out[f"f:{key}"] = {}
    return out


def with_managed_fields(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod with the managedFields entry the Job controller's create leaves on it."""
    pod = copy.deepcopy(pod)
    owned = {
        "metadata": {k: v for k, v in pod["metadata"].items() if k != "managedFields"},
        "spec": pod["spec"],
    }
    pod["metadata"]["managedFields"] = [
        {
            "manager": "kube-controller-manager",
            "operation": "Update",
            "apiVersion": "v1",
            "time": "2025-01-01T00:00:00Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": _fields_v1(owned),
        }
    ]
    return pod


def body(pod: dict[str, Any], namespace: str = NAMESPACE, uid: str = PLACEHOLDER) -> bytes:
    """The AdmissionReview JSON for a pod CREATE, compact, on one line."""
    return orjson.dumps(review(pod, namespace, uid=uid))


UNIQUE_ANNOTATION = "bench.locust.io/request"


def unique(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod with the uid placeholder in an annotation too: every request then carries a pod
    of its own, and the webhook's memo of identical pods never answers."""
    pod = copy.deepcopy(pod)
    pod["metadata"].setdefault("annotations", {})[UNIQUE_ANNOTATION] = PLACEHOLDER
    return pod


def load_mix(per_kind: int = 10, unique_pods: bool = False) -> list[tuple[str, bytes]]:
    """(kind, body): for each i, the OTel master and worker of `otel-<i>` and the master of
    `plain-<i>` (which gets the exporter sidecar). The 30 bodies repeat, as the pods of one Job
    do; with `unique_pods`, no two requests carry the same pod."""
    mix = []
    for i in range(per_kind):
        for kind, test, role in (
            ("otel-master", f"otel-{i}", "master"),
            ("otel-worker", f"otel-{i}", "worker"),
            ("exporter-master", f"plain-{i}", "master"),
        ):
            pod = with_managed_fields(operator_pod(test, role, workers=20))
            mix.append((kind, body(unique(pod) if unique_pods else pod)))
    return mix


START_PLACEHOLDER = "BENCH-START-PLACEHOLDER"
START_ANNOTATION = "bench.locust.io/start"


def test_starts(per_kind: int = 10, workers: int = 20) -> list[tuple[str, bytes]]:
    """(kind, body): load tests starting, as the operator's two Jobs create their pods: for
    each of `otel-<i>` and `plain-<i>`, the master pod, then `workers` identical worker pods.
    Every pod carries START_PLACEHOLDER in an annotation, which the wrk script replaces with a
    number that changes on each pass through the list: every pass starts every test anew, so
    its master and first worker are new to the webhook and the other workers are not."""
    mix = []
    for i in range(per_kind):
        for prefix, kind in (("otel", "otel"), ("plain", "exporter")):
            test = f"{prefix}-{i}"
            for role, count in (("master", 1), ("worker", workers)):
                pod = with_managed_fields(operator_pod(test, role, workers=workers))
                pod["metadata"].setdefault("annotations", {})[START_ANNOTATION] = START_PLACEHOLDER
                label = (
                    "plain-worker" if (kind, role) == ("exporter", "worker") else f"{kind}-{role}"
                )
                mix.extend([(label, body(pod))] * count)
    return mix


def _filler_container(index: int) -> dict[str, Any]:
    return {
        "name": f"sidecar-{index}",
        "image": f"registry.example.com/platform/sidecar-{index}:1.24.3",
        "imagePullPolicy": "IfNotPresent",
        "args": ["--config=/etc/sidecar/config.yaml", "--log-level=info"],
        "ports": [{"containerPort": 9000 + index, "name": f"side-{index}", "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "128Mi"},
        },
        "volumeMounts": [{"mountPath": "/etc/sidecar", "name": "sidecar-config"}],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }


def _padding_env(prefix: str) -> list[dict[str, Any]]:
    return [
        {"name": f"{prefix}_SETTING_{j:02d}", "value": f"value-{j:02d}-for-{prefix.lower()}"}
        for j in range(ENV_PER_CONTAINER)
    ]


def scale_pod(containers: int, managed_fields: bool) -> dict[str, Any]:
    """An OTel master pod with `containers` containers (the Locust one plus sidecars)."""
    pod = operator_pod("otel-0", "master", workers=20)
    locust = pod["spec"]["containers"][0]
    locust["env"] = _padding_env("LOCUST")
    for index in range(1, containers):
        extra = _filler_container(index)
        extra["env"] = _padding_env(f"SIDECAR_{index}")
        pod["spec"]["containers"].append(extra)
    if containers > 1:
        pod["spec"]["volumes"].append({"name": "sidecar-config", "emptyDir": {}})
    return with_managed_fields(pod) if managed_fields else pod


def write_bodies(path: Path, bodies: list[bytes]) -> None:
    """One body per line, for the wrk script."""
    for item in bodies:
        if b"\n" in item or PLACEHOLDER.encode() not in item:
            raise ValueError("a body must be one line and carry the uid placeholder")
    path.write_bytes(b"\n".join(bodies) + b"\n")
