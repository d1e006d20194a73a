"""Shared test helpers: mutate a pod through the full path and check every invariant on the way."""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from webhook.config import MUTATION_OPTIONS, SERVE_OPTIONS, MutationSettings, add_options
from webhook.models import LocustTestInfo, parse_locusttest
from webhook.mutation import MutationResult, mutate
from webhook.patch import diff

# The oldest and newest Kubernetes versions the webhook supports (native sidecars: 1.29).
SCHEMA_VERSIONS = ("1.29.0", "1.33.0")


def cli(*args: str, **options: Any) -> subprocess.CompletedProcess[str]:
    """Run `locust-webhook ARGS`, output captured as text; `options` go to subprocess.run."""
    command = [str(Path(sys.executable).parent / "locust-webhook"), *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=30, check=False, **options
    )


def validate_pod(pod: dict[str, Any]) -> None:
    """Strict offline validation against the Kubernetes Pod schema."""
    for version in SCHEMA_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


@dataclass
class Mutated:
    """A mutation's result with the patch the webhook would send."""

    sent: dict[str, Any]
    result: MutationResult
    patch: list[dict[str, Any]]

    @property
    def pod(self) -> dict[str, Any]:
        return self.result.pod

    def container(self, index: int = 0) -> dict[str, Any]:
        return dict(self.pod["spec"]["containers"][index])

    def env(self, index: int = 0) -> list[dict[str, Any]]:
        return list(self.container(index).get("env") or [])

    def env_names(self, index: int = 0) -> list[str]:
        return [e["name"] for e in self.env(index)]

    def env_value(self, name: str, index: int = 0) -> Any:
        values = [e.get("value") for e in self.env(index) if e["name"] == name]
        assert len(values) <= 1, f"{name} defined {len(values)} times"
        return values[0] if values else None


def run_mutation(
    pod: dict[str, Any],
    test: dict[str, Any],
    namespace: str = "default",
    settings: MutationSettings | None = None,
) -> Mutated:
    """Mutate, then check: the input is untouched, the patch applies strictly to the pod as sent
    and yields the wanted pod, the result is a valid Pod, and mutating again changes nothing."""
    settings = settings or MutationSettings()
    info = parse_locusttest(test)
    sent = copy.deepcopy(pod)
    result = mutate(pod, info, namespace, settings)
    assert pod == sent, "mutate() changed the pod it was given"
    patch = diff(pod, result.pod)
    applied = jsonpatch.JsonPatch(patch).apply(copy.deepcopy(sent))
    assert applied == result.pod, "the patch does not produce the wanted pod"
    validate_pod(applied)
    again = mutate(applied, info, namespace, settings)
    assert diff(applied, again.pod) == [], "mutating twice differs from mutating once"
    return Mutated(sent, result, patch)


class Source:
    """LocustTests in a dict, as a LocustTestSource; replaceable while a handler runs (as the
    watch replaces them)."""

    def __init__(self, *tests: dict[str, Any]) -> None:
        self.tests: dict[tuple[str, str], LocustTestInfo] = {}
        for test in tests:
            self.put(test)

    def put(self, test: dict[str, Any]) -> None:
        info = parse_locusttest(test)
        self.tests[(info.namespace, info.name)] = info

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def ready(self) -> bool:
        return True

    def size(self) -> int:
        return len(self.tests)

    def get(self, namespace: str, name: str) -> LocustTestInfo | None:
        return self.tests.get((namespace, name))


@pytest.fixture
def settings() -> MutationSettings:
    return MutationSettings()


def parse_serve(argv: list[str]) -> argparse.Namespace:
    """`serve`'s command line, as its parser reads it."""
    parser = argparse.ArgumentParser()
    add_options(parser, SERVE_OPTIONS)
    add_options(parser, MUTATION_OPTIONS)
    return parser.parse_args(argv)


@pytest.fixture
def cert_args(tmp_path: Path) -> list[str]:
    """`--cert-file` and `--key-file` of files that exist (their content is not read here)."""
    (tmp_path / "tls.crt").write_text("c")
    (tmp_path / "tls.key").write_text("k")
    return ["--cert-file", str(tmp_path / "tls.crt"), "--key-file", str(tmp_path / "tls.key")]
