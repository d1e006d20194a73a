"""The Dockerfile's properties (there is no Docker engine here to build it): pinned base and
dependencies (constraints.txt), multi-stage, installed from the project's metadata, non-root
numeric user matching the Deployment, read-only-root friendly, and the same `locust-webhook
serve` command."""

from __future__ import annotations

import json
import re
import shlex
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# An exact Python release on a named Debian release, e.g. python:3.11.13-slim-bookworm.
PINNED_BASE = re.compile(r"^python:\d+\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?$")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    """Instructions grouped by FROM."""
    grouped: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            grouped.append([])
        if grouped:
            grouped[-1].append((keyword, rest))
    return grouped


def final(keyword: str) -> str:
    """The arguments of the last `keyword` of the final stage."""
    found = [rest for k, rest in stages()[-1] if k == keyword]
    assert found, f"the final stage has no {keyword}"
    return found[-1]


def exec_form(keyword: str) -> list[str]:
    value = json.loads(final(keyword))
    assert isinstance(value, list), f"{keyword} must be in exec form (a JSON list)"
    return [str(v) for v in value]


def deployment_container() -> dict[str, Any]:
    deployment = yaml.safe_load((ROOT / "deploy/base/deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_is_multi_stage_on_one_pinned_slim_base() -> None:
    bases = [rest.split()[0] for k, rest in instructions() if k == "FROM"]
    assert len(bases) >= 2
    for base in bases:
        assert PINNED_BASE.match(base), f"{base} is not a pinned slim Python image"
    # The venv's python is a symlink into the base image: both stages must be the same one.
    assert len(set(bases)) == 1
    assert any(k == "COPY" and rest.startswith("--from=") for k, rest in stages()[-1])


def test_dependencies_come_from_the_project_metadata() -> None:
    build = stages()[0]
    copied = " ".join(rest for k, rest in build if k == "COPY")
    assert "pyproject.toml" in copied
    installs = [rest for k, rest in build if k == "RUN" and "pip install" in rest]
    assert installs, "the build stage installs the project"
    for command in installs:
        words = shlex.split(command)
        assert "-r" not in words and "--requirement" not in words, "no second list of deps"
        assert "-e" not in words and "--editable" not in words, "the runtime has no sources"
        target = words[-1]
        assert target in ("/src", "."), f"pip installs {target}, not the project"
        assert "--constraint" in words, "the versions come from constraints.txt"
        assert words[words.index("--constraint") + 1] == "constraints.txt"
    assert "constraints.txt" in copied


def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}; every line must be `name==version`."""
    result = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{line} is not a pin"
            result[canonicalize_name(requirement.name)] = specifier.version
    return result


def runtime_requirements() -> list[Requirement]:
    """Every requirement reachable from the project's own, without its extras (the image's
    dependencies), read from the installed distributions' metadata."""
    found: list[Requirement] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [("locust-observability-webhook", frozenset[str]())]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for line in metadata.requires(name) or ():
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in ("", *extras)):
                found.append(requirement)
                todo.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return found


def test_constraints_pin_every_runtime_dependency_as_installed_and_within_its_ranges() -> None:
    pinned = pins()
    required = runtime_requirements()
    names = {canonicalize_name(r.name) for r in required}
    assert len(names) >= 10, names
    assert names <= pinned.keys(), f"not pinned: {sorted(names - pinned.keys())}"
    assert pinned.keys() <= names, f"pinned but not needed: {sorted(pinned.keys() - names)}"
    for requirement in required:
        version = pinned[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{requirement.name}=={version} is outside {requirement}"
        )
    # `make install` installs with the constraints: the tests run what the image ships.
    for name, version in pinned.items():
        assert metadata.version(name) == version, name


def test_runs_as_a_non_root_numeric_user_matching_the_deployment() -> None:
    user, _, group = final("USER").partition(":")
    assert user.isdigit() and int(user) != 0
    assert not group or (group.isdigit() and int(group) != 0)
    security = deployment_container()["securityContext"]
    assert security["runAsUser"] == int(user)
    if group:
        assert security["runAsGroup"] == int(group)


def test_entrypoint_is_the_deployments_serve_command() -> None:
    command = exec_form("ENTRYPOINT") + exec_form("CMD")
    container = deployment_container()
    assert command == ["locust-webhook", "serve"]
    assert "command" not in container, "the Deployment keeps the image's ENTRYPOINT"
    assert exec_form("ENTRYPOINT") + container["args"] == command


def test_works_with_a_read_only_root_filesystem() -> None:
    env = final("ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "TMPDIR=/tmp" in env
    # The preStop pause runs the image's own interpreter: it must exist at that path.
    python = deployment_container()["lifecycle"]["preStop"]["exec"]["command"][0]
    venv = python.removesuffix("/bin/python")
    assert f"PATH={venv}/bin:" in env
    assert any(k == "COPY" and rest.endswith(f"{venv} {venv}") for k, rest in stages()[-1])


def test_exposes_the_serving_port() -> None:
    (port,) = deployment_container()["ports"]
    assert final("EXPOSE") == str(port["containerPort"])


def test_build_context_is_only_what_the_image_installs() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # An allow-list: everything is excluded (local certs/, .venv/, .git/ ...), then only what
    # the image installs is let back in.
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "constraints.txt", "README.md", "webhook"}
