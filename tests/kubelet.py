"""The part of the API server and kubelet a test needs to run a pod's container as a process.

Only what Kubernetes does, the way it does it: a name from `generateName`, the request's
namespace and a uid (API server), a node and a pod IP (scheduler, kubelet), downward-API
`fieldRef` values, `$(VAR)` expansion of env values in order (a value sees only the variables
defined before it; `$$` escapes; an undefined reference stays as written), and `$(VAR)`
expansion of `command` and `args` with the container's final environment. Anything a pod could
ask for that needs cluster objects (Secrets, ConfigMaps, `envFrom`, resource limits) is refused
rather than faked.
"""

from __future__ import annotations

import copy
import re
import secrets
import uuid
from collections.abc import Callable, Mapping
from typing import Any

# k8s.io/apimachinery/pkg/util/rand: the alphabet generated names are drawn from
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_MAX_NAME = 63
_SUFFIX = 5

_SUBSCRIPT = re.compile(r"^(metadata\.(?:labels|annotations))\['(.+)'\]$")


def generate_name(base: str) -> str:
    """What the API server's SimpleNameGenerator makes of `generateName`."""
    base = base[: _MAX_NAME - _SUFFIX]
    return base + "".join(secrets.choice(_NAME_ALPHABET) for _ in range(_SUFFIX))


def create_pod(
    pod: dict[str, Any],
    namespace: str,
    *,
    node_name: str = "kind-worker",
    pod_ip: str = "127.0.0.1",
    host_ip: str = "127.0.0.1",
) -> dict[str, Any]:
    """The pod as stored and then run: named, namespaced, with a uid, scheduled, with an IP."""
    created = copy.deepcopy(pod)
    metadata = created.setdefault("metadata", {})
    if not metadata.get("name"):
        metadata["name"] = generate_name(metadata["generateName"])
    metadata["namespace"] = namespace
    metadata["uid"] = str(uuid.uuid4())
    created.setdefault("spec", {})["nodeName"] = node_name
    status = created.setdefault("status", {})
    status.update(
        {
            "phase": "Running",
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
        }
    )
    return created


def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """Kubernetes `$(VAR)` expansion (third_party/forked/golang/expansion), byte for byte.

    `$(NAME)` becomes the value when `lookup` knows NAME and stays `$(NAME)` otherwise; `$$`
    becomes `$`; `$` before anything else, or an unclosed `$(`, is kept as written.
    """
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1 :]
            if rest[0] == "$":
                out.append("$")
                advance = 1
            elif rest[0] == "(":
                close = rest.find(")", 1)
                if close == -1:
                    out.append("$(")
                    advance = 1
                else:
                    name = rest[1:close]
                    value = lookup(name)
                    out.append(f"$({name})" if value is None else value)
                    advance = close + 1
            else:
                out.append("$" + rest[0])
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)


def field_ref(pod: Mapping[str, Any], path: str) -> str:
    """A downward-API `fieldRef.fieldPath` as the kubelet resolves it for an env var."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    simple: dict[str, Callable[[], Any]] = {
        "metadata.name": lambda: metadata["name"],
        "metadata.namespace": lambda: metadata["namespace"],
        "metadata.uid": lambda: metadata["uid"],
        "spec.nodeName": lambda: spec["nodeName"],
        "spec.serviceAccountName": lambda: spec.get("serviceAccountName", "default"),
        "status.hostIP": lambda: status["hostIP"],
        "status.hostIPs": lambda: ",".join(i["ip"] for i in status["hostIPs"]),
        "status.podIP": lambda: status["podIP"],
        "status.podIPs": lambda: ",".join(i["ip"] for i in status["podIPs"]),
        "metadata.labels": lambda: _format_map(metadata.get("labels") or {}),
        "metadata.annotations": lambda: _format_map(metadata.get("annotations") or {}),
    }
    if path in simple:
        return str(simple[path]())
    subscript = _SUBSCRIPT.match(path)
    if subscript:
        source = metadata.get(subscript.group(1).split(".")[1]) or {}
        return str(source.get(subscript.group(2), ""))
    raise ValueError(f"unsupported fieldPath {path!r}")


def _format_map(values: Mapping[str, str]) -> str:
    # the downward API's labels/annotations format: sorted key="value" lines
    return "\n".join(f'{key}="{values[key]}"' for key in sorted(values))


def find_container(pod: Mapping[str, Any], name: str) -> dict[str, Any]:
    spec = pod["spec"]
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        if container["name"] == name:
            return dict(container)
    raise KeyError(f"no container {name!r} in the pod")


def container_env(pod: Mapping[str, Any], container_name: str) -> dict[str, str]:
    """The container's environment: each `env` entry in order, `$(VAR)` resolved against the
    entries before it, `fieldRef` values from the pod; a later duplicate name wins."""
    container = find_container(pod, container_name)
    if container.get("envFrom"):
        raise NotImplementedError("envFrom needs ConfigMaps/Secrets, which do not exist here")
    env: dict[str, str] = {}
    for entry in container.get("env") or []:
        name = entry["name"]
        source = entry.get("valueFrom")
        if source is None:
            env[name] = expand(entry.get("value", ""), env.get)
        elif "fieldRef" in source:
            env[name] = field_ref(pod, source["fieldRef"]["fieldPath"])
        else:
            raise NotImplementedError(f"{name}: valueFrom {sorted(source)} needs cluster objects")
    return env


def container_argv(
    pod: Mapping[str, Any], container_name: str, env: Mapping[str, str], entrypoint: list[str]
) -> list[str]:
    """`command` (or the image's entrypoint) plus `args`, `$(VAR)` expanded with the final env."""
    container = find_container(pod, container_name)
    command = [expand(c, env.get) for c in container.get("command") or []] or list(entrypoint)
    return [*command, *(expand(a, env.get) for a in container.get("args") or [])]
