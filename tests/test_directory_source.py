"""`serve --locusttests DIR`: LocustTests from YAML files, re-read when the directory changes;
a file that cannot be read is skipped with a warning and never stops the others."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures import locusttest, operator_pod
from test_cache import wait_until
from test_memo import admit, env_of

from webhook.config import MutationSettings
from webhook.handler import Handler
from webhook.lookup import DirectorySource
from webhook.models import REQUIRED_ANNOTATION

LATIN_1 = "# caf\xe9\nkind: LocustTest\n".encode("latin-1")  # not UTF-8
GRPC = "http://otel-collector.monitoring:4317"
HTTP = "http://otel-collector.monitoring:4318"


def write(directory: Path, name: str, test_name: str) -> None:
    (directory / name).write_text(yaml.safe_dump(locusttest(test_name)))


def test_a_file_that_is_not_utf8_is_skipped_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, "a.yaml", "good")
    (tmp_path / "b.yaml").write_bytes(LATIN_1)
    source = DirectorySource(tmp_path)
    assert source.get("default", "good") is not None
    assert source.size() == 1
    assert "skipping" in caplog.text and "b.yaml" in caplog.text


def test_the_directory_is_still_followed_after_a_bad_file_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="webhook.lookup")
    write(tmp_path, "a.yaml", "first")
    source = DirectorySource(tmp_path, poll_seconds=0.02)
    source.start()
    try:
        (tmp_path / "b.yaml").write_bytes(LATIN_1)
        wait_until(lambda: "b.yaml" in caplog.text)
        write(tmp_path, "c.yaml", "later")
        wait_until(lambda: source.get("default", "later") is not None)
        assert source.get("default", "first") is not None
    finally:
        source.stop()


def write_all(directory: Path, name: str, documents: list[dict[str, Any]]) -> None:
    (directory / name).write_text(yaml.safe_dump_all(documents))


@pytest.mark.parametrize(
    "files", [("a.yaml", "b.yaml"), ("b.yaml", "a.yaml")], ids=["v2 file first", "v1 file first"]
)
def test_v2_wins_over_v1_whichever_file_comes_first(tmp_path: Path, files: tuple[str, str]) -> None:
    v2_file, v1_file = files
    write_all(tmp_path, v2_file, [locusttest("both", otel={"enabled": True})])
    write_all(tmp_path, v1_file, [locusttest("both", version="v1")])
    found = DirectorySource(tmp_path).get("default", "both")
    assert found is not None and found.api_version == "locust.io/v2" and found.otel_enabled


def test_v2_wins_over_v1_later_in_the_same_file(tmp_path: Path) -> None:
    write_all(
        tmp_path,
        "tests.yaml",
        [locusttest("both", version="v1"), locusttest("both", otel={"enabled": True})],
    )
    found = DirectorySource(tmp_path).get("default", "both")
    assert found is not None and found.otel_enabled


def test_only_locusttests_are_read_from_a_file_of_other_objects(tmp_path: Path) -> None:
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo-scripts"}}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "demo-master"}}
    write_all(tmp_path, "all.yaml", [other, locusttest("demo"), job])
    source = DirectorySource(tmp_path)
    assert source.get("default", "demo-scripts") is None
    assert source.get("default", "demo-master") is None
    assert source.size() == 1


def test_a_malformed_locusttest_is_skipped_and_the_others_are_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nameless = {"apiVersion": "locust.io/v2", "kind": "LocustTest", "metadata": {}}
    write_all(tmp_path, "a.yaml", [nameless, locusttest("good")])
    source = DirectorySource(tmp_path)
    assert source.get("default", "good") is not None
    assert source.size() == 1
    assert "skipping a LocustTest in" in caplog.text and "metadata.name is missing" in caplog.text


@pytest.mark.parametrize(
    ("annotations", "allowed"), [(None, True), ({REQUIRED_ANNOTATION: "true"}, False)]
)
def test_the_pods_of_an_invalid_locusttest_are_told_why_and_required_still_holds(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    annotations: dict[str, str] | None,
    allowed: bool,
) -> None:
    otel = {"enabled": True, "extraEnvVars": ["A=1"]}
    broken = locusttest("broken", otel=otel, annotations=annotations)
    write_all(tmp_path, "a.yaml", [broken])
    response = admit(
        Handler(DirectorySource(tmp_path), MutationSettings()), operator_pod("broken", "master")
    )
    message = (
        "LocustTest default/broken: cannot be read (spec.observability.openTelemetry."
        "extraEnvVars is not an object): observability was not injected"
    )
    assert response["allowed"] is allowed and "patch" not in response
    assert (response.get("warnings") or [response["status"]["message"]]) == [message]
    assert f"invalid LocustTest default/broken in {tmp_path / 'a.yaml'}" in caplog.text


@pytest.mark.parametrize(
    "otel",
    [{"enabled": "yes"}, {"enabled": 1}, {"enabled": True, "insecure": "true"}],
    ids=["enabled yes", "enabled 1", "insecure as a string"],
)
def test_switches_that_are_not_booleans_make_a_locusttest_invalid(
    tmp_path: Path, otel: dict[str, object]
) -> None:
    """The CRD's schema makes them booleans; read otherwise they silently meant false."""
    write_all(
        tmp_path,
        "a.yaml",
        [
            locusttest("odd", otel=otel),
            locusttest(
                "null", otel={"enabled": True, "endpoint": "http://c:4317", "insecure": None}
            ),
        ],
    )
    source = DirectorySource(tmp_path)
    odd = source.get("default", "odd")
    assert odd is not None
    assert odd.problem == "spec.observability.openTelemetry enabled/insecure must be true or false"
    null = source.get("default", "null")  # null: not set, as the API server prunes it
    assert null is not None and null.problem == "" and null.otel_enabled


def test_an_edit_that_keeps_the_file_size_is_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    write_all(tmp_path, "a.yaml", [locusttest("demo", otel={"enabled": True, "endpoint": GRPC})])
    source = DirectorySource(tmp_path, poll_seconds=0.02)
    source.start()
    try:
        edited = path.read_text().replace(GRPC, HTTP)
        assert len(edited) == len(path.read_text())
        before = path.stat().st_mtime_ns
        path.write_text(edited)
        # An editor's save a second later (here both writes may share a clock tick).
        os.utime(path, ns=(before + 10**9, before + 10**9))

        def endpoint() -> str | None:
            found = source.get("default", "demo")
            return found.otel.endpoint if found and found.otel else None

        wait_until(lambda: endpoint() == HTTP)
    finally:
        source.stop()


def test_yml_files_are_read(tmp_path: Path) -> None:
    write_all(tmp_path, "short.yml", [locusttest("short")])
    write_all(tmp_path, "long.yaml", [locusttest("long")])
    source = DirectorySource(tmp_path)
    assert source.get("default", "short") is not None
    assert source.get("default", "long") is not None


def test_a_locusttest_without_a_namespace_is_in_default(tmp_path: Path) -> None:
    test = locusttest("anywhere")
    del test["metadata"]["namespace"]
    write_all(tmp_path, "a.yaml", [test])
    assert DirectorySource(tmp_path).get("default", "anywhere") is not None


def test_the_endpoint_is_injected_without_surrounding_whitespace(tmp_path: Path) -> None:
    # A folded block scalar (`>`) ends with a newline; a quoted one may keep stray spaces.
    (tmp_path / "a.yaml").write_text(
        "apiVersion: locust.io/v2\n"
        "kind: LocustTest\n"
        "metadata: {name: folded}\n"
        "spec:\n"
        "  observability:\n"
        "    openTelemetry:\n"
        "      enabled: true\n"
        "      endpoint: >\n"
        f"        {GRPC}\n"
        "---\n"
        f"{yaml.safe_dump(locusttest('quoted', otel={'enabled': True, 'endpoint': f'  {GRPC} '}))}"
    )
    handler = Handler(DirectorySource(tmp_path), MutationSettings())
    for name in ("folded", "quoted"):
        response = admit(handler, operator_pod(name, "worker"))
        assert env_of(response)["OTEL_EXPORTER_OTLP_ENDPOINT"] == GRPC
