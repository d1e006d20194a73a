"""What the webhook keeps of a LocustTest: parsed once, when it enters the cache."""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any

DEFAULT_PROTOCOL = "grpc"
PROTOCOLS = ("grpc", "http/protobuf")
REQUIRED_ANNOTATION = "observability.locust.io/required"


class InvalidLocustTest(ValueError):
    """The object is not a LocustTest we can read (no name, wrong shape)."""


@dataclass(frozen=True, slots=True, weakref_slot=True)
class OtelSpec:
    """`spec.observability.openTelemetry` of a v2 LocustTest, with the CRD's defaults applied."""

    enabled: bool
    endpoint: str = ""
    protocol: str = DEFAULT_PROTOCOL
    insecure: bool = False
    # Sorted by key: the order the env vars are injected in.
    extra_env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class LocustTestInfo:
    """The few facts about one LocustTest that decide how its pods are mutated."""

    namespace: str
    name: str
    api_version: str
    required: bool
    otel: OtelSpec | None
    # Why the rest of the LocustTest cannot be read ('' when it can): its pods are then told so
    # instead of being mutated, and `required` still holds (see parse_locusttest).
    problem: str = ""

    @property
    def otel_enabled(self) -> bool:
        return self.otel is not None and self.otel.enabled


def _as_dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidLocustTest(f"{where} is not an object")
    return value


def parse_otel(observability: Any) -> OtelSpec | None:
    """Parse `spec.observability`; None when it has no `openTelemetry` block."""
    otel = _as_dict(
        _as_dict(observability, "spec.observability").get("openTelemetry"),
        "spec.observability.openTelemetry",
    )
    if not otel:
        return None
    extra = _as_dict(otel.get("extraEnvVars"), "spec.observability.openTelemetry.extraEnvVars")
    protocol = otel.get("protocol") or DEFAULT_PROTOCOL
    endpoint = otel.get("endpoint") or ""
    if not isinstance(protocol, str) or not isinstance(endpoint, str):
        raise InvalidLocustTest(
            "spec.observability.openTelemetry endpoint/protocol must be strings"
        )
    switches = (otel.get("enabled"), otel.get("insecure"))
    if any(value is not None and not isinstance(value, bool) for value in switches):
        raise InvalidLocustTest(
            "spec.observability.openTelemetry enabled/insecure must be true or false"
        )
    return _shared(
        OtelSpec(
            enabled=otel.get("enabled") is True,
            endpoint=endpoint.strip(),
            protocol=protocol,
            insecure=otel.get("insecure") is True,
            extra_env=tuple(
                sorted((str(k), "" if v is None else str(v)) for k, v in extra.items())
            ),
        )
    )


def _shared(spec: OtelSpec) -> OtelSpec:
    key = (spec.enabled, spec.endpoint, spec.protocol, spec.insecure, spec.extra_env)
    return _SPECS.setdefault(key, spec)


# Most LocustTests of a cluster send to the same collector with the same settings: they share
# one OtelSpec (and its strings) instead of holding a copy each. Weak values: a spec no cached
# LocustTest uses any more leaves the table.
_SPECS: weakref.WeakValueDictionary[tuple[Any, ...], OtelSpec] = weakref.WeakValueDictionary()


def parse_locusttest(obj: Any) -> LocustTestInfo:
    """A LocustTest object (v1 or v2, from the API or a YAML file) as LocustTestInfo. One with
    a name whose rest cannot be read comes back with `problem` saying why (and `required` as
    far as it can be read), so that its pods are told it is invalid rather than missing.

    Raises InvalidLocustTest only when the object has no name to keep it under."""
    if not isinstance(obj, dict):
        raise InvalidLocustTest("a LocustTest must be an object")
    metadata = _as_dict(obj.get("metadata"), "metadata")
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidLocustTest("metadata.name is missing")
    api_version = str(obj.get("apiVersion") or "")
    annotations = metadata.get("annotations")
    otel, problem = None, ""
    try:
        _as_dict(annotations, "metadata.annotations")
        if api_version.endswith("/v2"):
            otel = parse_otel(_as_dict(obj.get("spec"), "spec").get("observability"))
    except InvalidLocustTest as exc:
        problem = str(exc)
    # Thousands of tests share a few namespaces and versions: keep one copy of each string.
    return LocustTestInfo(
        namespace=sys.intern(str(metadata.get("namespace") or "default")),
        name=name,
        api_version=sys.intern(api_version),
        required=isinstance(annotations, dict) and annotations.get(REQUIRED_ANNOTATION) == "true",
        otel=otel,
        problem=problem,
    )


# The watcher process sends LocustTestInfo to the workers as JSON arrays (see webhook.feed).
Wire = list[Any]


def to_wire(info: LocustTestInfo) -> Wire:
    """`info` as a JSON-ready array: [namespace, name, apiVersion, required, otel or null,
    problem]."""
    otel = info.otel
    spec = (
        None
        if otel is None
        else [otel.enabled, otel.endpoint, otel.protocol, otel.insecure, otel.extra_env]
    )
    return [info.namespace, info.name, info.api_version, info.required, spec, info.problem]


def from_wire(record: Wire) -> LocustTestInfo:
    """The LocustTestInfo `to_wire` made `record` from, sharing strings and specs like a parse."""
    namespace, name, api_version, required, spec, problem = record
    otel = None
    if spec is not None:
        enabled, endpoint, protocol, insecure, extra_env = spec
        otel = _shared(
            OtelSpec(enabled, endpoint, protocol, insecure, tuple(map(tuple, extra_env)))
        )
    return LocustTestInfo(
        namespace=sys.intern(namespace),
        name=name,
        api_version=sys.intern(api_version),
        required=required,
        otel=otel,
        problem=problem,
    )
