"""Golden cases, one directory each under tests/cases/: the pod as the Job controller sends it
(`pod.yaml`, whose first line says what the case shows), its LocustTest (`locusttest.yaml`) and
the pod as wanted (`expected.yaml`). Each case goes through `run_mutation` (the patch applies
to the pod as sent and yields the wanted pod, the result is a valid Pod, mutating twice equals
once) and through the Handler as an AdmissionReview, whose encoded patch must yield the wanted
pod too; two of them also through `locust-webhook inject`."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from conftest import Source, cli, run_mutation
from fixtures import review

from webhook.config import MutationSettings
from webhook.handler import Handler

CASES = Path(__file__).parent / "cases"
NAMES = sorted(path.name for path in CASES.iterdir() if path.is_dir())


def load(case: str, name: str) -> dict[str, Any]:
    document = yaml.safe_load((CASES / case / name).read_text())
    assert isinstance(document, dict), f"{case}/{name} is not a mapping"
    return document


def test_every_case_directory_is_complete() -> None:
    assert len(NAMES) >= 10, f"only {len(NAMES)} golden cases under {CASES}"
    for case in NAMES:
        files = sorted(path.name for path in (CASES / case).iterdir())
        assert files == ["expected.yaml", "locusttest.yaml", "pod.yaml"], case


@pytest.mark.parametrize("case", NAMES)
def test_golden_case(case: str) -> None:
    sent, test, expected = (load(case, n) for n in ("pod.yaml", "locusttest.yaml", "expected.yaml"))
    namespace = test["metadata"].get("namespace", "default")

    assert run_mutation(sent, test, namespace).pod == expected

    handler = Handler(Source(test), MutationSettings())
    answer = json.loads(handler.handle(json.dumps(review(sent, namespace)).encode()))
    response = answer["response"]
    assert response["allowed"] is True
    patch = json.loads(base64.b64decode(response["patch"])) if "patch" in response else []
    assert jsonpatch.apply_patch(sent, patch) == expected


@pytest.mark.parametrize("case", ["otel-master", "exporter-master"])
def test_inject_prints_the_expected_pod(case: str) -> None:
    """The README's offline example: `locust-webhook inject` on a case prints its expected pod."""
    done = cli(
        "inject",
        "-f",
        str(CASES / case / "pod.yaml"),
        "--locusttest",
        str(CASES / case / "locusttest.yaml"),
    )
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout) == load(case, "expected.yaml")
