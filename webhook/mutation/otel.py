"""OpenTelemetry on: OTEL_* env, the --otel flag, and warnings for settings that cannot work."""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from ..models import PROTOCOLS, LocustTestInfo, OtelSpec
from .pod import (
    Container,
    Pod,
    Role,
    Target,
    env_value,
    image_repository,
    shown,
    with_container,
)

RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"
SERVICE_NAME = "OTEL_SERVICE_NAME"
POD_NAME_VAR = "OTEL_RESOURCE_ATTRIBUTES_POD_NAME"
ENABLE_VAR = "LOCUST_ENABLE_OPENTELEMETRY"
OTEL_FLAG = "--otel"
# Locust knows --otel (and LOCUST_ENABLE_OPENTELEMETRY) since 2.42.4; the locustio/locust image
# never carries the OpenTelemetry SDK (the extra locust[otel]): locustio/locust-otel does.
OTEL_SINCE = (2, 42, 4)
PLAIN_IMAGE = "locustio/locust"
MEMO_CHARS = 1024  # a setting longer than this is judged afresh, not remembered


def parse_attributes(raw: str) -> dict[str, str]:
    """`k=v,k2=v2` (OTEL_RESOURCE_ATTRIBUTES) as a dict; malformed members are skipped."""
    pairs = (member.split("=", 1) for member in raw.split(",") if "=" in member)
    return {key.strip(): value.strip() for key, value in pairs if key.strip()}


def _service_name(test: LocustTestInfo, user_attributes: str | None, container: Container) -> str:
    attributes = env_value(container, RESOURCE_ATTRIBUTES)
    if attributes is None:
        attributes = user_attributes or ""
    # The SDK percent-decodes OTEL_RESOURCE_ATTRIBUTES values; OTEL_SERVICE_NAME is taken as is.
    return unquote(parse_attributes(attributes).get("service.name") or "") or test.name


# The pods of a test share these: computed once per test (and namespace and role), not per pod.
@functools.lru_cache(maxsize=4096)
def _resource_attributes(user: str, namespace: str, test_name: str, role: Role) -> tuple[str, bool]:
    """The user's attributes with the k8s ones they did not set appended; and whether the
    pod-name variable is referenced."""
    ours = {
        "k8s.namespace.name": namespace,
        "k8s.pod.name": f"$({POD_NAME_VAR})",
        "locust.test.name": test_name,
    }
    if role != "unknown":
        ours["locust.role"] = role
    taken = parse_attributes(user)
    added = [f"{key}={value}" for key, value in ours.items() if key not in taken]
    merged = ",".join(part for part in (user.strip().strip(","), *added) if part)
    return merged, "k8s.pod.name" not in taken


@functools.lru_cache(maxsize=4096)
def _spec_env(spec: OtelSpec) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """The env vars the spec asks for, in SPEC order, and the user's OTEL_RESOURCE_ATTRIBUTES
    (from extraEnvVars; merged per pod)."""
    extra = dict(spec.extra_env)
    wanted: dict[str, str] = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
    }
    if spec.endpoint:
        wanted["OTEL_EXPORTER_OTLP_ENDPOINT"] = spec.endpoint
    wanted["OTEL_EXPORTER_OTLP_PROTOCOL"] = spec.protocol
    if spec.insecure:
        wanted["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
    # extraEnvVars override the standard values in place rather than repeating a name.
    for key in list(wanted):
        if key in extra:
            wanted[key] = extra.pop(key)
    user_attributes = extra.pop(RESOURCE_ATTRIBUTES, None)
    wanted.update(extra)
    return tuple(wanted.items()), user_attributes


def desired_env(
    test: LocustTestInfo,
    container: Container,
    namespace: str,
    target: Target,
    enrich: bool,
) -> list[dict[str, object]]:
    """The OTel env vars the container should end with, in SPEC order (before filtering out
    the names it already defines)."""
    assert test.otel is not None
    standard, user_attributes = _spec_env(test.otel)
    wanted = dict(standard)
    if SERVICE_NAME not in wanted and env_value(container, SERVICE_NAME) is None:
        wanted[SERVICE_NAME] = _service_name(test, user_attributes, container)
    if target.flag_by_env:
        wanted[ENABLE_VAR] = "true"
    env: list[dict[str, object]] = [{"name": k, "value": v} for k, v in wanted.items()]
    if env_value(container, RESOURCE_ATTRIBUTES) is not None:
        return env
    if enrich:
        merged, needs_pod_name = _resource_attributes(
            user_attributes or "", namespace, test.name, target.role
        )
        if needs_pod_name:
            env.append(
                {"name": POD_NAME_VAR, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
            )
        env.append({"name": RESOURCE_ATTRIBUTES, "value": merged})
    elif user_attributes is not None:
        env.append({"name": RESOURCE_ATTRIBUTES, "value": user_attributes})
    return env


def configured_natively(test: LocustTestInfo, container: Container, target: Target) -> bool:
    """The container already has what the v2 operator sets when it configures OpenTelemetry
    itself: `--otel` (or its env switch) and every variable the spec asks for, by name."""
    assert test.otel is not None
    if OTEL_FLAG not in target.words and env_value(container, ENABLE_VAR) is None:
        return False
    standard, user_attributes = _spec_env(test.otel)
    names = {entry["name"] for entry in container.get("env") or ()}
    wanted = [name for name, _ in standard]
    if user_attributes is not None:
        wanted.append(RESOURCE_ATTRIBUTES)
    return names.issuperset(wanted)


def inject_otel_env(
    pod: Pod, index: int, test: LocustTestInfo, namespace: str, target: Target, enrich: bool
) -> tuple[Pod, list[str], list[str]]:
    """Append the OTel env vars the Locust container lacks; the pod's own values win. Also
    says which of its own hide a value the LocustTest sets (`kept_warning`)."""
    assert test.otel is not None
    container = pod["spec"]["containers"][index]
    own = {entry["name"]: entry for entry in container.get("env") or ()}  # the last of a name
    desired = desired_env(test, container, namespace, target, enrich)
    # Judged on literal values only: one from valueFrom is not known here.
    kept = [
        name
        for entry in (desired if own else ())
        if (name := str(entry["name"])) in own
        and "value" in entry
        and isinstance(theirs := _literal(own[name]), str)
        and _setting(name, theirs) != _setting(name, str(entry["value"]))
    ]
    if RESOURCE_ATTRIBUTES in own:
        differences = _attributes_kept(own[RESOURCE_ATTRIBUTES], test.otel, target, enrich)
        if differences:
            kept.append(f"{RESOURCE_ATTRIBUTES} ({differences})")
    missing = [entry for entry in desired if entry["name"] not in own]
    if not missing:
        return pod, [], kept
    updated = {**container, "env": [*(container.get("env") or ()), *missing]}
    added = [f"env:{e['name']}" for e in missing]
    return with_container(pod, "containers", index, updated), added, kept


def _literal(entry: dict[str, Any]) -> str | None:
    """The value an env entry sets ('' without a value), None when it is from valueFrom."""
    if entry.get("valueFrom") is not None:
        return None
    value = entry.get("value")
    return value if isinstance(value, str) else ""


def _protocol(value: str) -> str:
    """The protocol as Locust reads it: stripped, in any case, "http" for http/protobuf."""
    value = value.strip().lower()
    return "http/protobuf" if value == "http" else value


def _setting(name: str, value: str) -> str | bool:
    """A value as what reads it takes it: Locust the protocol and exporter names stripped and in
    any case ("http" for http/protobuf) and its switch as a flag, the gRPC exporter `insecure`
    in any case."""
    if name == "OTEL_EXPORTER_OTLP_PROTOCOL":
        return _protocol(value)
    if name.endswith("_EXPORTER"):
        return value.strip().lower()
    if name == "OTEL_EXPORTER_OTLP_INSECURE":
        return value.lower()
    if name == ENABLE_VAR:
        return value.lower() in ("true", "1", "yes", "on")
    return value


def _attributes_kept(own: dict[str, Any], spec: OtelSpec, target: Target, enrich: bool) -> str:
    """How the pod's own literal OTEL_RESOURCE_ATTRIBUTES (kept as it is) differs from what
    the webhook would set: the attributes it goes without, and the LocustTest's it gives
    other values; '' when none."""
    value = _literal(own)
    if value is None:
        return ""
    theirs = parse_attributes(value)
    asked = parse_attributes(_spec_env(spec)[1] or "")
    ours = {"k8s.namespace.name", "k8s.pod.name", "locust.test.name"} if enrich else set()
    if enrich and target.role != "unknown":
        ours.add("locust.role")
    without = sorted((asked.keys() | ours) - theirs.keys())
    other = sorted(key for key, wanted in asked.items() if theirs.get(key, wanted) != wanted)
    parts = [f"without {', '.join(without)}"] if without else []
    if other:
        parts.append(f"other values of {', '.join(other)}")
    return "; ".join(parts)


def kept_warning(test: LocustTestInfo, kept: list[str]) -> str:
    """The pod's own variables (its template's, or another webhook's that ran first) win over
    what the webhook would set (SPEC section 4): say so when they differ."""
    return (
        f"LocustTest {test.namespace}/{test.name}: the pod sets {', '.join(kept)} itself, "
        "which is kept over what the webhook would set"
    )


def add_otel_flag(pod: Pod, index: int, target: Target) -> tuple[Pod, list[str]]:
    """`--otel` once in the args, before --master/--worker, else last. Where args cannot carry
    it (Target.flag_by_env), inject_otel_env sets LOCUST_ENABLE_OPENTELEMETRY instead."""
    if target.flag_by_env or OTEL_FLAG in target.words:
        return pod, []
    container = pod["spec"]["containers"][index]
    args = list(container.get("args") or ())
    position = next((i for i, a in enumerate(args) if a in ("--master", "--worker")), len(args))
    args.insert(position, OTEL_FLAG)
    return with_container(pod, "containers", index, {**container, "args": args}), [
        f"arg:{OTEL_FLAG}"
    ]


class Unknown(enum.Enum):
    """A setting whose effect the webhook cannot tell: set from a source it cannot read
    (valueFrom), or overridden per signal."""

    VALUE = "unknown"


UNKNOWN = Unknown.VALUE
Setting = str | None | Literal[Unknown.VALUE]  # None: not set at all
# The exporters and Locust read these before the OTEL_EXPORTER_OTLP_* ones they override.
PER_SIGNAL = frozenset(
    f"OTEL_EXPORTER_OTLP_{signal}_{setting}"
    for signal in ("TRACES", "METRICS", "LOGS")
    for setting in ("ENDPOINT", "PROTOCOL", "INSECURE")
)


def _effective(
    own: dict[str, dict[str, Any]], extra: dict[str, str], name: str, default: str | None
) -> Setting:
    """The value the SDK will see: the pod's own env (`own`, by name; an entry without a value
    sets it to ''), else extraEnvVars, else `default`."""
    entry = own.get(name)
    if entry is None:
        return extra.get(name, default)
    value = _literal(entry)
    return UNKNOWN if value is None else value


def otel_warnings(test: LocustTestInfo, container: Container) -> list[str]:
    """Settings the real Python OTLP exporters cannot work with (SPEC section 4 table), and
    resource attributes Locust replaces with its own."""
    assert test.otel is not None
    spec = test.otel
    extra = dict(spec.extra_env)
    # The last entry of a name, as the kubelet (and env_value) reads it.
    own = {entry["name"]: entry for entry in container.get("env") or ()}
    attributes = _effective(own, extra, RESOURCE_ATTRIBUTES, None)
    endpoint: Setting = UNKNOWN
    protocol: Setting = UNKNOWN
    insecure: Setting = UNKNOWN
    if PER_SIGNAL.isdisjoint(own) and PER_SIGNAL.isdisjoint(extra):
        endpoint = _effective(own, extra, "OTEL_EXPORTER_OTLP_ENDPOINT", spec.endpoint)
        protocol = _effective(own, extra, "OTEL_EXPORTER_OTLP_PROTOCOL", spec.protocol)
        insecure = _effective(
            own, extra, "OTEL_EXPORTER_OTLP_INSECURE", "true" if spec.insecure else None
        )
    where = f"LocustTest {test.namespace}/{test.name}"
    image = container.get("image")
    settings = (
        where,
        endpoint,
        protocol,
        insecure,
        attributes if isinstance(attributes, str) else "",
        image if isinstance(image, str) else "",
    )
    # The verdicts are remembered for typical values only: these come from the pod, and a pod
    # may carry megabytes in them.
    judge: Callable[..., tuple[str, ...]] = _warnings
    for value in settings:
        if isinstance(value, str) and len(value) > MEMO_CHARS:
            judge = _warnings.__wrapped__
            break
    return list(judge(*settings))


USERINFO = re.compile(r"[^\s/'\"@]+@")


def without_credentials(text: str) -> str:
    """An endpoint (or a message quoting one) with any `user:password@` masked: warnings reach
    the log and whoever created the pod."""
    return USERINFO.sub("***@", text) if "@" in text else text


def _image_warning(where: str, image: str) -> str | None:
    """The Locust image cannot export: Locust before OTEL_SINCE, or the plain locustio/locust
    image (any tag, any registry), which lacks the SDK."""
    repository = image_repository(image)
    if repository != PLAIN_IMAGE and not repository.endswith(f"/{PLAIN_IMAGE}"):
        return None
    tag = image.split("@", 1)[0][len(repository) + 1 :]
    version = re.match(r"(\d{1,9})\.(\d{1,9})\.(\d{1,9})", tag)
    if version and tuple(int(part) for part in version.groups()) < OTEL_SINCE:
        return (
            f"{where}: image {shown(image)}: Locust {version[0]} has no OpenTelemetry support (it "
            f"came in {'.'.join(map(str, OTEL_SINCE))}): it stops at --otel (unrecognized "
            "arguments) and ignores "
            f"{ENABLE_VAR}; use locustio/locust-otel (2.43.4 or later) as the LocustTest's image"
        )
    return (
        f"{where}: image {shown(image)} has no OpenTelemetry SDK: Locust logs 'OpenTelemetry "
        "SDK is not installed' and exports nothing; use locustio/locust-otel, or an image that "
        "installs locust[otel], as the LocustTest's image"
    )


def service_name_warning(test: LocustTestInfo, container: Container) -> str | None:
    """A pod left as the operator configured it (SPEC section 6) keeps Locust's default
    service name when it has no OTEL_SERVICE_NAME, whatever its resource attributes say."""
    attributes = env_value(container, RESOURCE_ATTRIBUTES)
    if env_value(container, SERVICE_NAME) is not None or attributes is None:
        return None
    if "service.name" not in parse_attributes(attributes):
        return None
    return (
        f"LocustTest {test.namespace}/{test.name}: Locust replaces the service.name in "
        "OTEL_RESOURCE_ATTRIBUTES with its default 'locust' unless OTEL_SERVICE_NAME is set, "
        "and this pod, configured by the operator, is left as it is: add OTEL_SERVICE_NAME to "
        "spec.observability.openTelemetry.extraEnvVars"
    )


def env_from_warning(test: LocustTestInfo, container: Container) -> str | None:
    """Variables from the container's envFrom (a ConfigMap or Secret, e.g. the v2 operator's
    spec.env refs) are invisible here, and the kubelet lets env override them: a user's
    OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES there would be replaced by the injected ones."""
    if not container.get("envFrom"):
        return None
    return (
        f"LocustTest {test.namespace}/{test.name}: the Locust container also takes variables "
        "from envFrom, which the webhook cannot read, and the variables it adds to env replace "
        "any of the same name there: set OpenTelemetry variables in "
        "spec.observability.openTelemetry.extraEnvVars instead"
    )


# The same few settings come back for every pod of a test: remember their verdicts.
@functools.lru_cache(maxsize=1024)
def _warnings(
    where: str, endpoint: Setting, protocol: Setting, insecure: Setting, attributes: str, image: str
) -> tuple[str, ...]:
    warnings: list[str] = []
    unusable = _image_warning(where, image)
    if unusable:
        warnings.append(unusable)
    if "service.version" in parse_attributes(attributes):
        warnings.append(
            f"{where}: Locust sets service.version to its own version, replacing the "
            "service.version in OTEL_RESOURCE_ATTRIBUTES; use another key (e.g. test.version)"
        )
    if endpoint is not UNKNOWN and not endpoint:
        warnings.append(
            f"{where}: OpenTelemetry is enabled without an endpoint: set "
            "spec.observability.openTelemetry.endpoint to the collector (e.g. "
            "http://otel-collector.monitoring:4317), or nothing will be exported"
        )
        return tuple(warnings)
    if endpoint is UNKNOWN or protocol is UNKNOWN:
        return tuple(warnings)
    chosen = _protocol("grpc" if protocol is None else protocol)
    if chosen not in PROTOCOLS:
        warnings.append(
            f"{where}: protocol {shown(protocol or '')} is not supported; use grpc or http/protobuf"
        )
        return tuple(warnings)
    protocol = chosen
    has_scheme = "://" in endpoint
    quoted = shown(without_credentials(endpoint))
    try:
        parts = urlsplit(endpoint if has_scheme else f"//{endpoint}")
    except ValueError as exc:  # an unclosed [ (IPv6), a host NFKC alters: the exporters fail too
        reason = shown(without_credentials(str(exc)))
        warnings.append(
            f"{where}: endpoint {quoted} is not a URL ({reason}): nothing will be exported"
        )
        return tuple(warnings)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if protocol == "grpc" and port == 4318:
        warnings.append(
            f"{where}: endpoint port 4318 is OTLP/HTTP but protocol is grpc: "
            "use port 4317 or protocol http/protobuf"
        )
    if protocol == "http/protobuf" and port == 4317:
        warnings.append(
            f"{where}: endpoint port 4317 is OTLP/gRPC but protocol is http/protobuf: "
            "use port 4318 or protocol grpc"
        )
    # The gRPC exporter reads OTEL_EXPORTER_OTLP_INSECURE, when it is set at all, as true
    # only when it is "true" in any case, not stripped: any other value, '' included, means
    # TLS. Unset (None), TLS unless the scheme is http.
    insecure_true = isinstance(insecure, str) and insecure.lower() == "true"
    if protocol == "grpc" and insecure is not UNKNOWN:
        if scheme == "http" and insecure is not None and not insecure_true:
            warnings.append(
                f"{where}: OTEL_EXPORTER_OTLP_INSECURE={shown(insecure)} makes the gRPC exporter "
                f"use TLS towards {quoted} (any value but true does): it fails against a plaintext "
                "collector; remove it"
            )
        if not has_scheme and not insecure_true:
            warnings.append(
                f"{where}: endpoint {quoted} has no scheme and insecure is not true: the "
                "gRPC exporter will use TLS and fail against a plaintext collector; use "
                "http:// before it or set insecure: true"
            )
    if scheme == "https" and insecure_true:
        warnings.append(
            f"{where}: insecure is true but the endpoint is https://: the Python OTLP exporters "
            "then use TLS and verify the collector's certificate all the same; use http:// for "
            "a plaintext collector, or trust its CA with OTEL_EXPORTER_OTLP_CERTIFICATE in "
            "extraEnvVars"
        )
    if protocol == "http/protobuf" and not has_scheme:
        warnings.append(
            f"{where}: endpoint {quoted} has no scheme: the OTLP/HTTP exporter fails at "
            "once; put http:// before it"
        )
    return tuple(warnings)
