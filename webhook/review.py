"""The AdmissionReview envelope: parse what the API server sends, build what it expects back."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import orjson

API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")

MAX_UID = 128
MAX_NAMESPACE = 63  # a DNS label


class BadReview(ValueError):
    """The body is not an AdmissionReview we can answer: the caller's fault (HTTP 400)."""


class StatusDict(TypedDict, total=False):
    code: int
    message: str
    reason: str


class ResponseDict(TypedDict, total=False):
    uid: str
    allowed: bool
    patchType: Literal["JSONPatch"]
    patch: str
    warnings: list[str]
    status: StatusDict


@dataclass(frozen=True, slots=True)
class Review:
    """The parts of `request` the webhook reads."""

    api_version: str
    uid: str
    kind: dict[str, Any]
    operation: str
    namespace: str
    sub_resource: str
    dry_run: bool
    object: Any

    @property
    def is_pod_create(self) -> bool:
        """A Pod CREATE (not a subresource): the only request we mutate."""
        return (
            self.operation == "CREATE"
            and not self.sub_resource
            and self.kind.get("group") == ""
            and self.kind.get("version") == "v1"
            and self.kind.get("kind") == "Pod"
        )


def _field(request: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = request.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise BadReview(f"request.{name} must be a {kind.__name__}")
    return value


def parse_review(body: bytes) -> Review:
    """Decode and check an AdmissionReview body; raises BadReview with a message for the caller."""
    if not body:
        raise BadReview("empty body: expected an AdmissionReview")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadReview(f"body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadReview("body is not an AdmissionReview object")
    api_version = document.get("apiVersion")
    if document.get("kind") != "AdmissionReview" or api_version not in API_VERSIONS:
        raise BadReview(
            "body is not an AdmissionReview (kind AdmissionReview, apiVersion "
            + " or ".join(API_VERSIONS)
            + ")"
        )
    request = document.get("request")
    if not isinstance(request, dict):
        raise BadReview("AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("request.uid is missing")
    if len(uid) > MAX_UID:  # the API server's are UUIDs; every log line carries it
        raise BadReview(f"request.uid is longer than {MAX_UID} characters")
    namespace = _field(request, "namespace", str, "")
    if len(namespace) > MAX_NAMESPACE:
        raise BadReview(f"request.namespace is longer than a namespace name ({MAX_NAMESPACE})")
    return Review(
        api_version=api_version,
        uid=uid,
        kind=_field(request, "kind", dict, {}),
        operation=_field(request, "operation", str, ""),
        namespace=namespace,
        sub_resource=_field(request, "subResource", str, ""),
        dry_run=_field(request, "dryRun", bool, False),
        object=request.get("object"),
    )


def allowed(uid: str, warnings: list[str] | None = None) -> ResponseDict:
    """Admit unchanged."""
    response: ResponseDict = {"uid": uid, "allowed": True}
    if warnings:
        response["warnings"] = warnings
    return response


def encode_patch(patch: list[dict[str, Any]]) -> str:
    """A JSON patch as `response.patch` carries it (base64 of its JSON); '' for no change."""
    return base64.b64encode(orjson.dumps(patch)).decode("ascii") if patch else ""


def patched(uid: str, patch: str, warnings: list[str] | None = None) -> ResponseDict:
    """Admit with an encoded JSON patch (`encode_patch`); an empty one admits unchanged."""
    response = allowed(uid, warnings)
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = patch
    return response


def denied(uid: str, message: str) -> ResponseDict:
    """Refuse the pod with a message the user sees."""
    return {
        "uid": uid,
        "allowed": False,
        "status": {"code": 403, "message": message, "reason": "Forbidden"},
    }


def envelope(api_version: str, response: ResponseDict) -> bytes:
    """The AdmissionReview answer, in the version that was asked."""
    return orjson.dumps(
        {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}
    )
