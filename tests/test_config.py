"""Settings validation: a value the webhook could not work with stops it at start, with a message
that names the flag and its environment variable (tests/test_cli.py: precedence, defaults)."""

from __future__ import annotations

import re

import pytest
from conftest import parse_serve

from webhook.config import SettingError, serve_settings


@pytest.mark.parametrize("raw", ["false", "0", "no", "off", "False", " OFF "])
def test_resource_attributes_can_be_turned_off(cert_args: list[str], raw: str) -> None:
    env = {"LOCUST_WEBHOOK_RESOURCE_ATTRIBUTES": raw}
    assert serve_settings(parse_serve(cert_args), env).mutation.resource_attributes is False


@pytest.mark.parametrize("raw", ["true", "1", "yes", "on", "TRUE"])
def test_resource_attributes_can_be_turned_on(cert_args: list[str], raw: str) -> None:
    settings = serve_settings(parse_serve([*cert_args, "--resource-attributes", raw]), {})
    assert settings.mutation.resource_attributes is True


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        # The API server would refuse every patched pod: refused at start instead.
        (["--exporter-memory-limit", "64Mix"], {}, "--exporter-memory-limit"),
        (
            [],
            {"LOCUST_WEBHOOK_EXPORTER_CPU_REQUEST": "10m\n"},
            "LOCUST_WEBHOOK_EXPORTER_CPU_REQUEST",
        ),
        (["--exporter-image", "locust exporter:v1"], {}, "--exporter-image"),
        ([], {"LOCUST_WEBHOOK_EXPORTER_IMAGE": "exporter:v1\n"}, "LOCUST_WEBHOOK_EXPORTER_IMAGE"),
        (["--resource-attributes", "disabled"], {}, "--resource-attributes"),
        (["--lookup-timeout", "0"], {}, "--lookup-timeout"),
        ([], {"LOCUST_WEBHOOK_LOOKUP_TIMEOUT": "3601"}, "LOCUST_WEBHOOK_LOOKUP_TIMEOUT"),
        (["--namespaces", f"team-a,{'n' * 64}"], {}, "--namespaces"),
        (["--namespaces", "team-a,-team-b"], {}, "--namespaces"),
        ([], {"LOCUST_WEBHOOK_NAMESPACES": "team-a,team.b"}, "LOCUST_WEBHOOK_NAMESPACES"),
    ],
    ids=[
        "quantity with a suffix after the unit",
        "quantity with a trailing newline",
        "image with a space",
        "image with a trailing newline",
        "boolean neither true nor false",
        "no time for a lookup",
        "lookup timeout over an hour",
        "namespace of 64 characters",
        "namespace starting with a dash",
        "namespace with a dot",
    ],
)
def test_unusable_values_are_refused_naming_the_setting(
    cert_args: list[str], argv: list[str], env: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingError, match=re.escape(named)):
        serve_settings(parse_serve([*cert_args, *argv]), env)


def test_the_longest_namespace_name_and_the_shortest_timeout_are_accepted(
    cert_args: list[str],
) -> None:
    settings = serve_settings(
        parse_serve(
            [*cert_args, "--namespaces", f"team-a, {'n' * 63}", "--lookup-timeout", "0.01"]
        ),
        {},
    )
    assert settings.namespaces == ("n" * 63, "team-a")
    assert settings.lookup_timeout == 0.01
