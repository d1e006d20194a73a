"""Pure pod mutation: pod in, pod out. No Flask, no Kubernetes client, no clock, no I/O.

`mutate` is idempotent: mutating its output again returns that output unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import orjson

from ..config import MutationSettings
from ..models import LocustTestInfo
from .exporter import (
    add_metrics_exporter,
    add_scrape_annotations,
    remove_metrics_exporter,
    scrape_annotation_warning,
)
from .otel import (
    add_otel_flag,
    configured_natively,
    env_from_warning,
    inject_otel_env,
    kept_warning,
    otel_warnings,
    service_name_warning,
)
from .pod import (
    STATUS_ANNOTATION,
    MalformedPod,
    NoTarget,
    Pod,
    Role,
    check_shape,
    find_target,
    opted_out,
    owner_job,
    pod_annotations,
    web_port,
    with_annotations,
)

__all__ = [
    "MalformedPod",
    "MutationResult",
    "NoTarget",
    "check_shape",
    "fingerprint",
    "mutate",
    "opted_out",
]


@dataclass(frozen=True)
class MutationResult:
    """The pod as wanted, and what was done to get there."""

    pod: Pod
    mode: str
    role: Role
    container: str
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _job_note(pod: Pod, test: LocustTestInfo, role: Role) -> list[str]:
    """The operator names the Job `<name with dots as dashes>-<role>`; say so when it is not."""
    job = owner_job(pod)
    if job is None or role == "unknown":
        return []
    expected = f"{test.name.replace('.', '-')}-{role}"
    if job != expected:
        shown = job if len(job) <= 80 else job[:80] + "..."
        return [f"owning Job {shown!r} is not {expected!r}, the name the operator gives it"]
    return []


INLINE_FINGERPRINT = 4096


def fingerprint(pod: Pod) -> bytes | None:
    """A key for every part of the pod that `mutate` reads or edits, with whether each is
    present (an absent field and a null one patch differently): two pods with the same
    fingerprint get the same patch from the same LocustTest, namespace and settings. The pods
    of one Job are identical, so a test's workers are mutated once. None when the pod cannot be
    fingerprinted (it is then mutated on its own; `mutate` says what is wrong with it)."""
    metadata = pod.get("metadata")
    spec = pod.get("spec")
    if not isinstance(metadata, dict) or not isinstance(spec, dict):
        return None
    read = [
        [key in metadata, metadata.get(key)] for key in ("labels", "annotations", "ownerReferences")
    ] + [[key in spec, spec.get(key)] for key in ("containers", "initContainers")]
    try:
        encoded = orjson.dumps(read)
    except TypeError:
        return None
    # A typical pod's are ~1.2 KB: the bytes themselves are the key (hashing them costs more
    # than the dict's own hash and compare); larger ones are digested to keep the memo small.
    # Digests are 16 bytes, shorter than any encoding: the two kinds never meet.
    if len(encoded) <= INLINE_FINGERPRINT:
        return encoded
    return hashlib.blake2b(encoded, digest_size=16).digest()


def mutate(
    pod: Pod, test: LocustTestInfo, namespace: str, settings: MutationSettings
) -> MutationResult:
    """The pod with the observability the LocustTest asks for (SPEC sections 3-6).

    Raises MalformedPod or NoTarget when the pod cannot be mutated.
    """
    if opted_out(pod):  # whatever its shape, as the server skips it
        return MutationResult(pod, "opted-out", "unknown", "")
    check_shape(pod)
    target = find_target(pod)
    container = pod["spec"]["containers"][target.index]
    warnings: list[str] = []
    added: list[str] = []
    removed: list[str] = []
    if test.otel_enabled:
        mode = "otel"
        warnings.extend(otel_warnings(test, container))
        pod, removed = remove_metrics_exporter(pod, settings)
        native = STATUS_ANNOTATION not in pod_annotations(pod)  # else: the webhook's own work
        if native and not removed and configured_natively(test, container, target):
            # SPEC section 6: a pod the v2 operator configured natively is left as it is.
            warning = service_name_warning(test, container)
            if warning:
                warnings.append(warning)
            return MutationResult(
                pod, "operator-native", target.role, target.name, warnings=warnings,
                notes=_job_note(pod, test, target.role),
            )  # fmt: skip
        # Removing the exporter may shift the Locust container: find it again by name.
        index = next(i for i, c in enumerate(pod["spec"]["containers"]) if c["name"] == target.name)
        pod, env_added, kept = inject_otel_env(
            pod, index, test, namespace, target, settings.resource_attributes
        )
        if kept:
            warnings.append(kept_warning(test, kept))
        hidden = env_from_warning(test, container) if env_added else None
        if hidden:
            warnings.append(hidden)
        pod, flag_added = add_otel_flag(pod, index, target)
        added = env_added + flag_added
    elif target.role == "master":
        mode = "exporter"
        warning = scrape_annotation_warning(pod, settings)
        if warning:
            warnings.append(warning)
        pod, sidecar_added = add_metrics_exporter(pod, settings, web_port(container, target.words))
        pod, annotations_added = add_scrape_annotations(pod, settings)
        added = sidecar_added + annotations_added
    else:
        mode = "none"
    if added or removed:
        status = {
            "mode": mode,
            "container": target.name,
            "role": target.role,
            "added": added,
            "removed": removed,
        }
        pod = with_annotations(pod, {STATUS_ANNOTATION: orjson.dumps(status).decode()})
    return MutationResult(
        pod, mode, target.role, target.name, warnings, _job_note(pod, test, target.role)
    )
