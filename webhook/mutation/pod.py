"""Reading a pod: shape checks, the Locust container, its role, and copy-on-write edits.

Pods are plain dicts. Edits never change the pod they are given: they copy only the path they
touch, so untouched subtrees stay the very same objects and the patch can skip them by identity.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Any, Literal

Pod = dict[str, Any]
Container = dict[str, Any]
Role = Literal["master", "worker", "unknown"]
ContainerField = Literal["containers", "initContainers"]

TEST_NAME_LABEL = "performance-test-name"
POD_NAME_LABEL = "performance-test-pod-name"
CONTAINER_ANNOTATION = "observability.locust.io/container"
INJECT_ANNOTATION = "observability.locust.io/inject"
STATUS_ANNOTATION = "observability.locust.io/status"
EXPORTER_NAME = "locust-metrics-exporter"
DEFAULT_WEB_PORT = 8089

SHELLS = frozenset({"sh", "bash", "ash", "dash", "zsh", "ksh"})
SHELL_OPTIONS_WITH_VALUE = frozenset({"-o", "+o", "-O", "+O", "--rcfile", "--init-file"})
PROXY_NAMES = frozenset({"istio-proxy", "linkerd-proxy", "envoy", "envoy-sidecar"})
PROXY_IMAGES = ("proxyv2", "linkerd2-proxy", "envoyproxy/envoy")
# Locust's own long flags: `-f` (--locustfile) is too common elsewhere (`tail -f`) to tell.
LOCUST_FLAGS = frozenset({"--locustfile", "--master", "--worker"})


class MalformedPod(ValueError):
    """The pod does not have the shape of a Pod; the API server will refuse it anyway."""


class NoTarget(ValueError):
    """No container can be the Locust container (or the annotation names one that cannot)."""


STRINGS_ONLY = frozenset({str})


def _all_strings(values: Any) -> bool:
    # map/set run in C: a third of the time of a generator of isinstance calls, on every pod.
    return set(map(type, values)) <= STRINGS_ONLY


def check_shape(pod: Any) -> None:
    """Raise MalformedPod unless the fields the mutation reads or writes have their Pod types
    (the env of the Locust container is checked when find_target chooses it)."""
    if not isinstance(pod, dict):
        raise MalformedPod("request.object must be a Pod object")
    metadata = pod.get("metadata")
    if not isinstance(metadata, dict):
        raise MalformedPod("metadata must be an object")
    for key in ("labels", "annotations"):
        values = metadata.get(key)
        if values is not None and not (isinstance(values, dict) and _all_strings(values.values())):
            raise MalformedPod(f"metadata.{key} must be a map of strings")
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        raise MalformedPod("spec must be an object")
    for field in ("containers", "initContainers"):
        items = spec.get(field)
        if items is None and field == "initContainers":
            continue
        if not isinstance(items, list) or (field == "containers" and not items):
            raise MalformedPod(f"spec.{field} must be a list of containers")
        for index, container in enumerate(items):
            if not isinstance(container, dict) or not isinstance(container.get("name"), str):
                raise MalformedPod(f"spec.{field}[{index}] must be a container with a name")
            for key in ("args", "command"):
                words = container.get(key)
                if words is not None and not (isinstance(words, list) and _all_strings(words)):
                    raise MalformedPod(f"spec.{field}[{index}].{key} must be a list of strings")


def pod_labels(pod: Pod) -> dict[str, str]:
    return pod["metadata"].get("labels") or {}


def pod_annotations(pod: Pod) -> dict[str, str]:
    return pod["metadata"].get("annotations") or {}


def opted_out(pod: Any) -> bool:
    """The pod asks not to be touched (safe on any input: checked before the shape is)."""
    metadata = pod.get("metadata") if isinstance(pod, dict) else None
    values = metadata.get("annotations") if isinstance(metadata, dict) else None
    value = values.get(INJECT_ANNOTATION) if isinstance(values, dict) else None
    return isinstance(value, str) and value.strip().lower() == "false"


SHOWN_CHARS = 100  # of a value quoted in a warning


def shown(value: str) -> str:
    """A value from the pod or the LocustTest, quoted in a warning: cut when long."""
    return repr(value) if len(value) <= SHOWN_CHARS else repr(value[:SHOWN_CHARS]) + "..."


def image_repository(image: str) -> str:
    """The image without its digest and tag; a registry's `:port` is not a tag."""
    name = image.split("@", 1)[0]
    colon = name.rfind(":")
    return name[:colon] if colon > name.rfind("/") else name


def _is_sidecar(container: Container) -> bool:
    """The exporter or a service-mesh proxy: never the Locust container."""
    name = container["name"]
    image = str(container.get("image") or "")
    return name == EXPORTER_NAME or name in PROXY_NAMES or any(p in image for p in PROXY_IMAGES)


def _shell_script(words: list[str]) -> str | None:
    """The script of `sh -c SCRIPT`, else None. Options may surround -c or hold it (`-ec`,
    `bash -lc`, `-o pipefail -c`), and wrappers may come first (`env -u NAME`, `tini --`,
    `dumb-init --`): the shell is the first word that names one, before any `locust`."""
    for index, word in enumerate(words):
        program = word[word.rfind("/") + 1 :]
        if program in SHELLS:
            return _shell_c_script(words, index + 1)
        if program == "locust":
            return None
    return None


def _shell_c_script(words: list[str], index: int) -> str | None:
    """The SCRIPT of a shell's `-c SCRIPT`, its options starting at words[index]; else None."""
    command_mode = False
    while index < len(words):
        word = words[index]
        if word == "--":
            index += 1
            break
        if word in SHELL_OPTIONS_WITH_VALUE:
            index += 2
        elif word.startswith("--") or (len(word) > 1 and word[0] == "+"):
            index += 1
        elif len(word) > 1 and word[0] == "-":
            command_mode = command_mode or "c" in word[1:]
            index += 1
        else:
            break
    return words[index] if command_mode and index < len(words) else None


def locust_command(container: Container) -> tuple[list[str], bool]:
    """The words Locust sees, and whether it is started through a shell's `-c SCRIPT` (the
    words are then those of the script)."""
    words = [*(container.get("command") or ()), *(container.get("args") or ())]
    script = _shell_script(words)
    if script is None:
        return words, False
    try:
        return shlex.split(script), True
    except ValueError:
        return script.split(), True


def _runs_locust(container: Container) -> bool:
    repository = image_repository(str(container.get("image") or "")).rsplit("/", 1)[-1]
    if "locust" in repository and "exporter" not in repository:
        return True
    words, _ = locust_command(container)
    return bool(LOCUST_FLAGS.intersection(words)) or any(
        os.path.basename(w) == "locust" for w in words
    )


def target_container(pod: Pod) -> int:
    """Index in spec.containers of the Locust container (SPEC section 3)."""
    containers: list[Container] = pod["spec"]["containers"]
    chosen = pod_annotations(pod).get(CONTAINER_ANNOTATION)
    if chosen is not None:
        for index, container in enumerate(containers):
            if container["name"] == chosen:
                if _is_sidecar(container):
                    raise NoTarget(f"{CONTAINER_ANNOTATION}={shown(chosen)} names a sidecar")
                return index
        raise NoTarget(f"{CONTAINER_ANNOTATION}={shown(chosen)}: the pod has no such container")
    candidates = [(i, c) for i, c in enumerate(containers) if not _is_sidecar(c)]
    if not candidates:
        raise NoTarget("the pod has no container besides sidecars")
    pod_name = pod_labels(pod).get(POD_NAME_LABEL)
    for index, container in candidates:
        if container["name"] == pod_name:
            return index
    for index, container in candidates:
        if _runs_locust(container):
            return index
    return candidates[0][0]


def role_of(pod: Pod, words: list[str]) -> Role:
    """master or worker, from the Locust arguments first, then the pod-name label."""
    if "--master" in words:
        return "master"
    if "--worker" in words:
        return "worker"
    pod_name = pod_labels(pod).get(POD_NAME_LABEL, "")
    if pod_name.endswith("-master"):
        return "master"
    if pod_name.endswith("-worker"):
        return "worker"
    return "unknown"


def _flag_value(words: list[str], flag: str) -> str | None:
    """The value of `--flag value`, `--flag=value`, or of a short flag, `-F value`, `-Fvalue`."""
    joined = flag + "=" if flag.startswith("--") else flag
    for index, word in enumerate(words):
        if word == flag and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(joined) and len(word) > len(joined):
            return word[len(joined) :]
    return None


def env_value(container: Container, name: str) -> str | None:
    """The literal value of an env var the container defines ('' for valueFrom), else None.
    A name defined twice has its last value, as the kubelet sets it."""
    for entry in reversed(container.get("env") or ()):
        if entry["name"] == name:
            value = entry.get("value")
            return value if isinstance(value, str) else ""
    return None


def web_port(container: Container, words: list[str]) -> int:
    """The port Locust's web UI listens on: --web-port (or -P), else LOCUST_WEB_PORT, else
    8089."""
    raw = (
        _flag_value(words, "--web-port")
        or _flag_value(words, "-P")
        or env_value(container, "LOCUST_WEB_PORT")
    )
    if raw and raw.isdecimal() and 0 < int(raw) < 65536:  # what int() reads, as Locust does
        return int(raw)
    return DEFAULT_WEB_PORT


def owner_job(pod: Pod) -> str | None:
    """Name of the Job that owns the pod, from ownerReferences or the Job controller's labels."""
    refs = pod["metadata"].get("ownerReferences")
    for ref in refs if isinstance(refs, list) else ():
        if isinstance(ref, dict) and ref.get("kind") == "Job" and isinstance(ref.get("name"), str):
            return str(ref["name"])
    values = pod_labels(pod)
    return values.get("batch.kubernetes.io/job-name") or values.get("job-name")


@dataclass(frozen=True, slots=True)
class Target:
    """The Locust container chosen for a pod, and what it is (read once per admission)."""

    index: int
    name: str
    role: Role
    words: list[str]  # what Locust is started with (the shell script's words when wrapped)
    # --otel cannot be added to the args: Locust's words are a shell's `-c` script, or the
    # image's CMD (no command, no args: args would replace it). LOCUST_ENABLE_OPENTELEMETRY then.
    flag_by_env: bool


def find_target(pod: Pod) -> Target:
    """The Locust container and its role; raises NoTarget or MalformedPod."""
    index = target_container(pod)
    container = pod["spec"]["containers"][index]
    env = container.get("env")
    if env is not None and (
        not isinstance(env, list)
        or not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in env)
    ):
        raise MalformedPod(f"spec.containers[{index}].env must be a list of named variables")
    words, shell = locust_command(container)
    flag_by_env = shell or not (container.get("command") or container.get("args"))
    return Target(index, container["name"], role_of(pod, words), words, flag_by_env)


def with_container(pod: Pod, field: ContainerField, index: int, container: Container) -> Pod:
    """A pod whose spec.<field>[index] is `container`."""
    items = list(pod["spec"][field])
    items[index] = container
    return with_spec_field(pod, field, items)


def with_spec_field(pod: Pod, field: str, value: Any) -> Pod:
    """A pod whose spec.<field> is `value` (None removes it)."""
    spec = dict(pod["spec"])
    if value is None:
        spec.pop(field, None)
    else:
        spec[field] = value
    return {**pod, "spec": spec}


def with_annotations(pod: Pod, values: dict[str, str | None]) -> Pod:
    """A pod with these annotations set (None removes one)."""
    current = dict(pod_annotations(pod))
    for key, value in values.items():
        if value is None:
            current.pop(key, None)
        else:
            current[key] = value
    return {**pod, "metadata": {**pod["metadata"], "annotations": current}}
