"""Pods as the v2 (Go) locust-k8s-operator builds them, for LocustTests written after its
samples: the operator already configures OpenTelemetry, or the exporter, itself. The webhook
leaves such pods as they are (SPEC section 6) and warns about what will not work."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Source, validate_pod
from fixtures import v2_operator_pod
from test_memo import admit

from webhook.config import MutationSettings
from webhook.handler import Handler


def v2_test(name: str, image: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "locust.io/v2",
        "kind": "LocustTest",
        "metadata": {"name": name, "namespace": "perf"},
        "spec": {
            "image": image,
            "master": {"command": "--locustfile /lotest/src/checkout.py --host https://shop.test"},
            "worker": {"command": "--locustfile /lotest/src/checkout.py", "replicas": 4},
            "testFiles": {"configMapRef": f"{name}-scripts"},
            **spec,
        },
    }


BASELINE = v2_test("checkout-baseline", "locustio/locust:2.43.1")
WITH_ENV = v2_test(
    "checkout-env",
    "locustio/locust:2.43.1",
    env={
        "configMapRefs": [{"name": "shop-settings"}],
        "variables": [{"name": "TARGET_HOST", "value": "https://shop.test"}],
    },
)
OTEL_MINIMAL = v2_test(
    "checkout-otel",
    "locustio/locust-otel:2.47.0",
    observability={
        "openTelemetry": {"enabled": True, "endpoint": "http://otel-collector.monitoring:4317"}
    },
)
OTEL_OLD_IMAGE = v2_test(
    "checkout.otel-sampled",
    "locustio/locust:2.32.0",
    observability={
        "openTelemetry": {
            "enabled": True,
            "endpoint": "otel-collector.monitoring:4317",
            "protocol": "grpc",
            "insecure": True,
            "extraEnvVars": {
                "OTEL_RESOURCE_ATTRIBUTES": "service.name=checkout,service.version=2.0.0",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.25",
            },
        }
    },
)
SCRAPED_UI = v2_test("checkout-scraped", "locustio/locust:2.43.1")
SCRAPED_UI["spec"]["master"]["annotations"] = {"prometheus.io/port": "8089"}
TESTS = [BASELINE, WITH_ENV, OTEL_MINIMAL, OTEL_OLD_IMAGE, SCRAPED_UI]


@pytest.mark.parametrize(
    ("test", "role", "mode", "warned"),
    [
        (BASELINE, "master", "exporter", []),
        (BASELINE, "worker", "none", []),
        (WITH_ENV, "master", "exporter", []),
        (WITH_ENV, "worker", "none", []),
        (OTEL_MINIMAL, "master", "operator-native", []),
        (OTEL_MINIMAL, "worker", "operator-native", []),
        (
            OTEL_OLD_IMAGE,
            "worker",
            "operator-native",
            ["2.32.0 has no OpenTelemetry support", "service.version", "service.name"],
        ),
        (SCRAPED_UI, "master", "exporter", ["prometheus.io/port"]),
    ],
    ids=lambda value: value["metadata"]["name"] if isinstance(value, dict) else None,
)
def test_a_pod_the_v2_operator_built_is_left_as_it_is_with_its_warnings(
    test: dict[str, Any], role: str, mode: str, warned: list[str]
) -> None:
    pod = v2_operator_pod(test, role)
    validate_pod(pod)
    handler = Handler(Source(*TESTS), MutationSettings())
    response = admit(handler, pod, "perf")
    assert response["allowed"] is True
    assert "patch" not in response, response.get("ops")
    warnings = response.get("warnings", [])
    assert len(warnings) == len(warned), warnings
    for part in warned:
        assert any(part in warning for warning in warnings), (part, warnings)
    assert handler._memo and next(iter(handler._memo.values())).mode == mode


def test_the_webhook_completes_what_a_v2_operator_pod_lacks_when_otel_is_turned_on() -> None:
    """A master built while OpenTelemetry was off (exporter, scrape annotations), admitted
    after the LocustTest turned it on: the exporter and its annotations go, OTel comes."""
    pod = v2_operator_pod(BASELINE, "master")
    turned_on = v2_test(
        "checkout-baseline",
        "locustio/locust-otel:2.47.0",
        observability={"openTelemetry": {"enabled": True, "endpoint": "http://otel:4317"}},
    )
    response = admit(Handler(Source(turned_on), MutationSettings()), pod, "perf")
    mutated = response["pod"]
    assert "initContainers" not in mutated["spec"] or mutated["spec"]["initContainers"] == []
    assert not any(k.startswith("prometheus.io/") for k in mutated["metadata"]["annotations"])
    args = mutated["spec"]["containers"][0]["args"]
    assert args.index("--otel") == args.index("--master") - 1
    env = {e["name"]: e.get("value") for e in mutated["spec"]["containers"][0]["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel:4317"
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "localhost:9092"  # the operator's own kept
