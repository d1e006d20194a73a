"""OpenTelemetry off: the Prometheus metrics exporter sidecar on the master, and its scrape
annotations; OpenTelemetry on: their removal."""

from __future__ import annotations

from typing import Any

import orjson

from ..config import MutationSettings
from .pod import (
    EXPORTER_NAME,
    Container,
    ContainerField,
    Pod,
    env_value,
    pod_annotations,
    shown,
    with_annotations,
    with_spec_field,
)

SCRAPE = "prometheus.io/scrape"
PATH = "prometheus.io/path"
PORT = "prometheus.io/port"
SCRAPE_KEYS = (SCRAPE, PATH, PORT)
FIELDS: tuple[ContainerField, ...] = ("containers", "initContainers")
# Istio's metrics merging: its injector points prometheus.io/* at its own agent (port 15020),
# which scrapes the endpoint the pod's annotations named before and merges it into its own;
# that endpoint is kept in this variable of the proxy, as JSON ({"scrape", "path", "port"}).
ISTIO_PROXY = "istio-proxy"
ISTIO_SCRAPE = "ISTIO_PROMETHEUS_ANNOTATIONS"


def has_exporter(pod: Pod) -> bool:
    """The pod already runs the exporter, as a container or as a (native) init container."""
    spec = pod["spec"]
    return any(c["name"] == EXPORTER_NAME for f in FIELDS for c in spec.get(f) or ())


def exporter_container(settings: MutationSettings, web_port: int) -> Container:
    """The exporter sidecar, pointed at Locust's web port on localhost."""
    requests = {"cpu": settings.exporter_cpu_request, "memory": settings.exporter_memory_request}
    limits = {"cpu": settings.exporter_cpu_limit, "memory": settings.exporter_memory_limit}
    resources = {
        section: {k: v for k, v in values.items() if v}
        for section, values in (("requests", requests), ("limits", limits))
        if any(values.values())
    }
    container: Container = {
        "name": EXPORTER_NAME,
        "image": settings.exporter_image,
        "imagePullPolicy": settings.exporter_pull_policy,
        "env": [
            {"name": "LOCUST_EXPORTER_URI", "value": f"http://localhost:{web_port}"},
            {"name": "LOCUST_EXPORTER_WEB_LISTEN_ADDRESS", "value": f":{settings.exporter_port}"},
        ],
        "ports": [{"name": "exporter", "containerPort": settings.exporter_port, "protocol": "TCP"}],
        "resources": resources,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        },
    }
    if settings.sidecar_mode == "native":
        # A native sidecar ends with the pod, so the master Job can complete.
        container["restartPolicy"] = "Always"
    return container


def add_metrics_exporter(
    pod: Pod, settings: MutationSettings, web_port: int
) -> tuple[Pod, list[str]]:
    """Add the exporter sidecar once (native init container, or plain container)."""
    if has_exporter(pod):
        return pod, []
    field: ContainerField = "initContainers" if settings.sidecar_mode == "native" else "containers"
    items = [*(pod["spec"].get(field) or ()), exporter_container(settings, web_port)]
    return with_spec_field(pod, field, items), [f"{field}:{EXPORTER_NAME}"]


def add_scrape_annotations(pod: Pod, settings: MutationSettings) -> tuple[Pod, list[str]]:
    """prometheus.io/* pointing at the exporter, unless the pod sets any of them itself."""
    current = pod_annotations(pod)
    if any(key in current for key in SCRAPE_KEYS):
        return pod, []
    values: dict[str, str | None] = {
        SCRAPE: "true",
        PATH: "/metrics",
        PORT: str(settings.exporter_port),
    }
    return with_annotations(pod, values), [f"annotation:{key}" for key in SCRAPE_KEYS]


def _istio_merged_port(pod: Pod) -> str | None:
    """The port Istio's agent scrapes and merges ('' when none); None without Istio's metrics
    merging (no Istio proxy, or merging off: then Istio leaves prometheus.io/* alone)."""
    for field in FIELDS:  # a native sidecar is an init container
        for container in pod["spec"].get(field) or ():
            if container["name"] != ISTIO_PROXY:
                continue
            raw = env_value(container, ISTIO_SCRAPE)
            if not raw:  # merging nothing, or off
                annotations = pod_annotations(pod)
                merging = annotations.get(PATH) == "/stats/prometheus"
                return "" if merging else None
            try:
                scrape = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return ""
            port = scrape.get("port") if isinstance(scrape, dict) else None
            return str(port) if isinstance(port, str | int) else ""
    return None


def scrape_annotation_warning(pod: Pod, settings: MutationSettings) -> str | None:
    """The pod's own prometheus.io/port sends scrapes somewhere other than the exporter."""
    port = pod_annotations(pod).get(PORT)
    exporter = str(settings.exporter_port)
    if port is None or port == exporter:
        return None
    merged = _istio_merged_port(pod)
    if merged == exporter:
        return None  # Istio's agent scrapes the exporter and serves its metrics at `port`
    if merged is not None:
        return (
            f"Istio merges the pod's metrics at {PORT}={shown(port)} without the metrics "
            f"exporter on port {exporter}: set {SCRAPE} 'true', {PATH} '/metrics' and {PORT} "
            f"'{exporter}' in the LocustTest's master annotations, which Istio's injector then "
            "merges"
        )
    return (
        f"the pod sets {PORT}={shown(port)} itself: annotation-based scraping will not reach "
        f"the metrics exporter on port {exporter}"
    )


def _exporter_ports(pod: Pod) -> set[str]:
    return {
        str(port.get("containerPort"))
        for f in FIELDS
        for c in pod["spec"].get(f) or ()
        if c["name"] == EXPORTER_NAME
        for port in c.get("ports") or ()
        if isinstance(port, dict)
    }


def remove_metrics_exporter(pod: Pod, settings: MutationSettings) -> tuple[Pod, list[str]]:
    """Drop the exporter container/init container and the scrape annotations aimed at it."""
    removed: list[str] = []
    port = pod_annotations(pod).get(PORT)
    if port is None and not has_exporter(pod):
        return pod, removed
    ports = _exporter_ports(pod) | {str(settings.exporter_port)}
    result = pod
    for field in FIELDS:
        items: list[Any] | None = result["spec"].get(field)
        if not items or not any(c["name"] == EXPORTER_NAME for c in items):
            continue
        kept = [c for c in items if c["name"] != EXPORTER_NAME]
        # An emptied initContainers goes away; containers always keeps the Locust container.
        result = with_spec_field(result, field, kept if kept or field == "containers" else None)
        removed.append(f"{field}:{EXPORTER_NAME}")
    current = pod_annotations(result)
    if port in ports:
        present = [key for key in SCRAPE_KEYS if key in current]
        result = with_annotations(result, dict.fromkeys(present))
        removed.extend(f"annotation:{key}" for key in present)
    return result, removed
