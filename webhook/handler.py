"""The only orchestrator: review in, answer out. The failure policy lives here, once."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from . import logs, metrics
from .config import MutationSettings
from .lookup import LocustTestSource, SourceUnavailable
from .models import LocustTestInfo
from .mutation import MalformedPod, NoTarget, fingerprint, mutate, opted_out
from .mutation.pod import TEST_NAME_LABEL
from .patch import diff
from .review import (
    MAX_NAMESPACE,
    BadReview,
    ResponseDict,
    Review,
    allowed,
    denied,
    encode_patch,
    envelope,
    parse_review,
    patched,
)

log = logs.ADMISSION
# Answers remembered per worker (~3.7 KB each for a typical pod, key included: ~1 MB when
# full). A test start is a burst of pods of two shapes (master, worker), so 256 covers 128 tests
# starting at once; when full the memo is emptied and refills on the next pod of each shape.
MEMO_SIZE = 256
# A patch longer than this (only a pod with odd containers makes one) is not remembered: 256 of
# them stay under 16 MB.
MEMO_PATCH_CHARS = 64 * 1024
NAME_CHARS = 253  # the longest name of a Kubernetes object, a LocustTest's included


def _metadata(pod: Any) -> dict[str, Any]:
    """The pod's metadata; {} when the pod or its metadata is not an object."""
    metadata = pod.get("metadata") if isinstance(pod, dict) else None
    return metadata if isinstance(metadata, dict) else {}


@dataclass
class Outcome:
    """What happened to one admission, for the response, the log line and the metrics."""

    response: ResponseDict
    outcome: str
    reason: str
    test: str = ""
    role: str = ""


def _malformed(review: Review, problem: str, test: str) -> Outcome:
    """A pod the webhook cannot read: admitted unchanged, whatever the failure policy."""
    return Outcome(
        allowed(review.uid, [f"pod not mutated: {problem}"]), "skipped", "malformed-pod", test
    )


def _not_injected(namespace: str, test: str, why: str) -> str:
    return f"LocustTest {namespace}/{test}: {why}: observability was not injected"


@dataclass(frozen=True, slots=True)
class Mutated:
    """What mutating a pod gave, without the request it came with: the same for every pod
    with the same fingerprint, LocustTest and namespace."""

    patch: str  # encoded (review.encode_patch); '' when the pod already has it all
    warnings: list[str]
    mode: str
    role: str
    notes: tuple[str, ...]


class Handler:
    """Turns an AdmissionReview body into the AdmissionReview answer."""

    def __init__(
        self,
        source: LocustTestSource,
        settings: MutationSettings,
        failure_policy: str = "open",
        namespaces: tuple[str, ...] = (),
    ) -> None:
        self.source = source
        self.settings = settings
        self.fail_closed = failure_policy == "closed"
        self.namespaces = frozenset(namespaces)  # empty: every namespace
        self._memo: dict[tuple[LocustTestInfo, str, bytes], Mutated] = {}

    def handle(self, body: bytes) -> bytes:
        """Answer one review. Raises BadReview (the caller's fault: HTTP 400)."""
        started = time.perf_counter()
        review = parse_review(body)
        result = self._decide(review)
        elapsed = time.perf_counter() - started
        metrics.admitted(result.outcome, result.reason, elapsed)
        metadata = _metadata(review.object)
        pod_name = metadata.get("generateName") or metadata.get("name")
        fields = {
            "uid": review.uid,
            "namespace": review.namespace,
            # Names are at most 253 characters: a longer pod name (no API server sends
            # one) is cut, a longer LocustTest name skipped as malformed (_decide), so that
            # a line stays one pipe write.
            "pod": pod_name[:NAME_CHARS] if isinstance(pod_name, str) else "",
            "locusttest": result.test,
            "role": result.role,
            "outcome": result.outcome,
            "reason": result.reason,
            "dry_run": review.dry_run,
            "ms": round(elapsed * 1000, 3),
        }
        # The pods that matter are created by the Job controller, which drops the answer's
        # warnings: the log line is where a user finds them.
        warnings = result.response.get("warnings")
        if warnings:
            fields["warnings"] = warnings
        logs.admission(fields)
        return envelope(review.api_version, result.response)

    def _refuse_or_allow(
        self,
        review: Review,
        reason: str,
        namespace: str,
        test: str,
        why: str,
        required: bool = False,
    ) -> Outcome:
        """The failure policy: deny when failing closed, else admit unchanged with a warning
        that says `why` the LocustTest's observability was not injected."""
        message = _not_injected(namespace, test, why)
        if self.fail_closed or required:
            return Outcome(denied(review.uid, message), "denied", reason, test)
        return Outcome(allowed(review.uid, [message]), "failed_open", reason, test)

    def _decide(self, review: Review) -> Outcome:
        if not review.is_pod_create:
            return Outcome(allowed(review.uid), "skipped", "not-pod-create")
        pod = review.object
        if not isinstance(pod, dict):
            raise BadReview("request.object must be a Pod object")
        metadata = _metadata(pod)
        pod_labels = metadata.get("labels")
        test_name = pod_labels.get(TEST_NAME_LABEL) if isinstance(pod_labels, dict) else None
        if not isinstance(test_name, str) or not test_name:
            return Outcome(allowed(review.uid), "skipped", "no-test-label")
        if len(test_name) > NAME_CHARS:
            return _malformed(review, f"its {TEST_NAME_LABEL} label is longer than any name", "")
        if opted_out(pod):
            return Outcome(allowed(review.uid), "skipped", "opted-out", test_name)
        # request.namespace; a hand-made review without one may name it in the pod.
        namespace = review.namespace or metadata.get("namespace")
        if namespace is None or namespace == "":
            return _malformed(review, "the request has no namespace", test_name)
        if not isinstance(namespace, str):
            return _malformed(review, "metadata.namespace must be a string", test_name)
        if len(namespace) > MAX_NAMESPACE:  # only metadata's: parse_review checked the request's
            return _malformed(
                review, "metadata.namespace is longer than a namespace name", test_name
            )
        if self.namespaces and namespace not in self.namespaces:
            why = f"namespace {namespace} is not among the webhook's --namespaces"
            return self._refuse_or_allow(review, "namespace-not-watched", namespace, test_name, why)
        try:
            test = self.source.get(namespace, test_name)
        except SourceUnavailable as exc:  # counted in LOOKUPS by the source itself
            why = f"could not be read ({exc})"
            return self._refuse_or_allow(review, "api-unavailable", namespace, test_name, why)
        except Exception:
            log.exception(
                "LocustTest lookup failed", extra={"uid": review.uid, "locusttest": test_name}
            )
            why = "internal error while reading it"
            return self._refuse_or_allow(review, "internal-error", namespace, test_name, why)
        if test is None:
            return self._refuse_or_allow(
                review, "locusttest-not-found", namespace, test_name, "not found"
            )
        if test.problem:
            why = f"cannot be read ({test.problem})"
            return self._refuse_or_allow(
                review, "locusttest-invalid", namespace, test_name, why, test.required
            )
        return self._mutate(review, pod, test, namespace)

    def _mutate(
        self, review: Review, pod: dict[str, Any], test: LocustTestInfo, namespace: str
    ) -> Outcome:
        name = test.name
        digest = fingerprint(pod)
        key = (test, namespace, digest) if digest is not None else None
        done = self._memo.get(key) if key is not None else None
        if done is None:
            try:
                result = mutate(pod, test, namespace, self.settings)
                patch = encode_patch(diff(pod, result.pod))
            except MalformedPod as exc:
                return _malformed(review, str(exc), name)
            except NoTarget as exc:
                message = _not_injected(namespace, name, str(exc))
                if test.required:
                    return Outcome(denied(review.uid, message), "denied", "no-target", name)
                return Outcome(allowed(review.uid, [message]), "skipped", "no-target", name)
            except Exception:
                log.exception("mutation failed", extra={"uid": review.uid, "locusttest": name})
                why = "internal error while mutating the pod"
                return self._refuse_or_allow(
                    review, "internal-error", namespace, name, why, test.required
                )
            done = Mutated(patch, result.warnings, result.mode, result.role, tuple(result.notes))
            if key is not None and len(patch) <= MEMO_PATCH_CHARS:
                if len(self._memo) >= MEMO_SIZE:
                    self._memo.clear()
                self._memo[key] = done
        for note in done.notes:
            log.warning(note, extra={"uid": review.uid, "locusttest": name})
        outcome = "patched" if done.patch else "unchanged"
        return Outcome(
            patched(review.uid, done.patch, done.warnings), outcome, done.mode, name, done.role
        )
