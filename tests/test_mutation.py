"""SPEC sections 3-6, row by row, on operator-shaped pods. Every case goes through
`run_mutation`, which also checks the patch against the pod as sent, the Pod schema, and
idempotency."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import run_mutation
from fixtures import locusttest, operator_pod

from webhook.config import MutationSettings
from webhook.models import parse_locusttest
from webhook.mutation import MalformedPod, NoTarget, mutate

ENDPOINT = "http://otel-collector.monitoring:4317"


def otel(**fields: Any) -> dict[str, Any]:
    return {"enabled": True, "endpoint": ENDPOINT, **fields}


def status(pod: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(pod["metadata"]["annotations"]["observability.locust.io/status"]))


# --- Section 3: role and target container -------------------------------------------------


@pytest.mark.parametrize("role", ["master", "worker"])
def test_role_comes_from_locust_args(role: str) -> None:
    pod = operator_pod("demo", role)
    pod["metadata"]["labels"]["performance-test-pod-name"] = "something-else"
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.result.role == role


@pytest.mark.parametrize("role", ["master", "worker"])
def test_role_falls_back_to_pod_name_label(role: str) -> None:
    pod = operator_pod("demo", role)
    pod["spec"]["containers"][0]["args"] = ["--locustfile", "/lotest/src/locustfile.py"]
    m = run_mutation(pod, locusttest("demo"))
    assert m.result.role == role


def test_unknown_role_gets_no_sidecar() -> None:
    pod = operator_pod("demo", "master")
    pod["spec"]["containers"][0]["args"] = ["--locustfile", "/lotest/src/locustfile.py"]
    pod["metadata"]["labels"]["performance-test-pod-name"] = "demo-runner"
    m = run_mutation(pod, locusttest("demo"))
    assert m.result.role == "unknown"
    assert m.patch == []


def test_target_is_container_named_like_pod_name_label() -> None:
    pod = operator_pod("demo", "worker")
    helper = {"name": "helper", "image": "busybox:1.36", "args": ["--worker"]}
    pod["spec"]["containers"].insert(0, helper)
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.result.container == "demo-worker"
    assert "env" not in m.container(0)
    assert "--otel" in m.container(1)["args"]


def test_target_is_first_locust_container_without_label_match() -> None:
    pod = operator_pod("demo", "worker")
    pod["metadata"]["labels"].pop("performance-test-pod-name")
    pod["spec"]["containers"].insert(0, {"name": "istio-proxy", "image": "istio/proxyv2:1.22"})
    pod["spec"]["containers"].insert(0, {"name": "log-shipper", "image": "fluent/fluent-bit:3"})
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.result.container == "demo-worker"


def test_locust_image_behind_a_registry_port_is_recognised_without_a_tag() -> None:
    pod = operator_pod("demo", "worker", image="registry.local:5000/team/locust")
    pod["metadata"]["labels"].pop("performance-test-pod-name")
    pod["spec"]["containers"][0]["args"] = ["--headless"]
    pod["spec"]["containers"].insert(0, {"name": "helper", "image": "registry.local:5000/busybox"})
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.result.container == "demo-worker"


def test_target_is_first_container_when_nothing_looks_like_locust() -> None:
    pod = operator_pod("demo", "worker")
    pod["metadata"]["labels"].pop("performance-test-pod-name")
    pod["spec"]["containers"][0].update(image="example.com/load:1", args=["--worker"])
    pod["spec"]["containers"][0]["args"] = ["run"]
    pod["spec"]["containers"].append({"name": "second", "image": "example.com/other:1"})
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.result.container == "demo-worker"


def test_container_annotation_overrides_the_choice() -> None:
    pod = operator_pod("demo", "worker", annotations={"observability.locust.io/container": "load"})
    pod["spec"]["containers"].append({"name": "load", "image": "example.com/load:1"})
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.result.container == "load"
    assert "OTEL_TRACES_EXPORTER" in m.env_names(1)
    assert "env" not in m.container(0)


@pytest.mark.parametrize("named", ["missing", "locust-metrics-exporter"])
def test_container_annotation_naming_no_usable_container_is_refused(named: str) -> None:
    pod = operator_pod("demo", "master", with_exporter=True)
    pod["metadata"]["annotations"] = {"observability.locust.io/container": named}
    with pytest.raises(NoTarget):
        mutate(pod, parse_locusttest(locusttest("demo")), "default", MutationSettings())


def test_exporter_and_mesh_proxy_are_never_the_target() -> None:
    pod = operator_pod("demo", "master", with_exporter=True)
    pod["metadata"]["labels"].pop("performance-test-pod-name")
    pod["spec"]["containers"].reverse()
    pod["spec"]["containers"].insert(0, {"name": "linkerd-proxy", "image": "cr.l5d.io/proxy:2"})
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.result.container == "demo-master"


@pytest.mark.parametrize("image", ["docker.io/istio/proxyv2:1.22.0", "envoyproxy/envoy:v1.31"])
def test_mesh_proxy_under_another_name_is_known_by_its_image(image: str) -> None:
    pod = operator_pod("demo", "worker", image="example.com/load:1")
    pod["metadata"]["labels"].pop("performance-test-pod-name")
    pod["spec"]["containers"][0]["args"] = ["run"]
    pod["spec"]["containers"].insert(0, {"name": "mesh", "image": image})
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.result.container == "demo-worker"


def test_locust_arguments_mark_the_locust_container() -> None:
    pod = operator_pod("demo", "worker", image="example.com/load:1")
    pod["metadata"]["labels"].pop("performance-test-pod-name")
    pod["spec"]["containers"].insert(0, {"name": "helper", "image": "busybox:1.36"})
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.result.container == "demo-worker"


def test_a_short_f_flag_alone_does_not_mark_a_locust_container() -> None:
    """`-f` is Locust's --locustfile, and also `tail -f`'s: a log shipper listed first is
    not the Locust container."""
    pod = operator_pod("demo", "worker")
    pod["metadata"]["labels"].pop("performance-test-pod-name")
    shipper = {"name": "log-shipper", "image": "busybox:1.36", "command": ["tail", "-f", "/x"]}
    pod["spec"]["containers"].insert(0, shipper)
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.result.container == "demo-worker"


def test_locust_exporter_image_is_not_a_locust_image() -> None:
    pod = operator_pod("demo", "worker", image="example.com/load:1")
    pod["metadata"]["labels"].pop("performance-test-pod-name")
    metrics = {"name": "metrics", "image": "containersol/locust_exporter:v0.5.0"}
    pod["spec"]["containers"].insert(0, metrics)
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.result.container == "demo-worker"


# --- Section 4.1: OTel env ----------------------------------------------------------------


def test_otel_env_in_spec_order_with_sorted_extras() -> None:
    test = locusttest(
        "demo",
        otel=otel(
            protocol="grpc",
            insecure=True,
            extraEnvVars={"OTEL_TRACES_SAMPLER_ARG": "0.1", "OTEL_TRACES_SAMPLER": "traceidratio"},
        ),
    )
    m = run_mutation(operator_pod("demo", "worker"), test)
    assert m.env_names() == [
        "OTEL_TRACES_EXPORTER",
        "OTEL_METRICS_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_INSECURE",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES_POD_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
    ]
    assert m.env_value("OTEL_TRACES_EXPORTER") == "otlp"
    assert m.env_value("OTEL_METRICS_EXPORTER") == "otlp"
    assert m.env_value("OTEL_EXPORTER_OTLP_ENDPOINT") == ENDPOINT
    assert m.env_value("OTEL_EXPORTER_OTLP_INSECURE") == "true"
    assert m.env_value("OTEL_TRACES_SAMPLER_ARG") == "0.1"


def test_endpoint_omitted_when_empty_and_protocol_defaults_to_grpc() -> None:
    m = run_mutation(operator_pod("demo", "worker"), locusttest("demo", otel={"enabled": True}))
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in m.env_names()
    assert m.env_value("OTEL_EXPORTER_OTLP_PROTOCOL") == "grpc"
    [warning] = m.result.warnings  # not also "no scheme" about an endpoint that is not there
    assert "without an endpoint" in warning


def test_insecure_false_sets_no_variable() -> None:
    m = run_mutation(operator_pod("demo", "worker"), locusttest("demo", otel=otel(insecure=False)))
    assert "OTEL_EXPORTER_OTLP_INSECURE" not in m.env_names()


def test_existing_otel_env_is_not_overridden_nor_duplicated() -> None:
    own = [
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://mine:4317"},
        {"name": "OTEL_SERVICE_NAME", "value": "mine"},
        {"name": "TARGET_HOST", "value": "https://api.example.com"},
    ]
    m = run_mutation(operator_pod("demo", "worker", env=own), locusttest("demo", otel=otel()))
    assert m.env()[:3] == own
    assert m.env_value("OTEL_EXPORTER_OTLP_ENDPOINT") == "http://mine:4317"
    assert m.env_value("OTEL_SERVICE_NAME") == "mine"
    assert len(m.env_names()) == len(set(m.env_names()))


def test_extra_env_overrides_a_standard_value_without_repeating_it() -> None:
    test = locusttest("demo", otel=otel(extraEnvVars={"OTEL_METRICS_EXPORTER": "none"}))
    m = run_mutation(operator_pod("demo", "worker"), test)
    assert m.env_value("OTEL_METRICS_EXPORTER") == "none"
    assert m.env_names().index("OTEL_METRICS_EXPORTER") == 1


def test_pod_configured_natively_by_the_operator_gets_an_empty_patch() -> None:
    test = locusttest("demo", otel=otel())
    first = run_mutation(operator_pod("demo", "master"), test)
    native = operator_pod("demo", "master", env=first.env())
    native["spec"]["containers"][0]["args"] = first.container()["args"]
    m = run_mutation(native, test)
    assert m.patch == []


def test_reinvocation_on_the_webhooks_own_work_is_not_called_operator_native() -> None:
    test = locusttest("demo", otel=otel())
    first = run_mutation(operator_pod("demo", "worker"), test)
    again = run_mutation(first.pod, test)
    assert again.patch == []
    assert again.result.mode == "otel"


def operator_native(role: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A pod as the v2 operator builds it with OpenTelemetry on: the standard variables and
    extraEnvVars (sorted), and `--otel` right before the mode flag; nothing else."""
    env = [
        {"name": "OTEL_TRACES_EXPORTER", "value": "otlp"},
        {"name": "OTEL_METRICS_EXPORTER", "value": "otlp"},
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": spec["endpoint"]},
        {"name": "OTEL_EXPORTER_OTLP_PROTOCOL", "value": spec.get("protocol", "grpc")},
    ]
    if spec.get("insecure"):
        env.append({"name": "OTEL_EXPORTER_OTLP_INSECURE", "value": "true"})
    extra = spec.get("extraEnvVars", {})
    env += [{"name": key, "value": extra[key]} for key in sorted(extra)]
    pod = operator_pod("demo", role, env=env)
    args = pod["spec"]["containers"][0]["args"]
    args.insert(args.index(f"--{role}"), "--otel")
    return pod


@pytest.mark.parametrize("role", ["master", "worker"])
@pytest.mark.parametrize(
    "spec",
    [
        otel(),
        otel(insecure=True, extraEnvVars={"OTEL_RESOURCE_ATTRIBUTES": "team=perf", "B": "2"}),
    ],
)
def test_pod_the_real_operator_configured_is_left_as_it_is(role: str, spec: dict[str, Any]) -> None:
    m = run_mutation(operator_native(role, spec), locusttest("demo", otel=spec))
    assert m.patch == []
    assert m.result.mode == "operator-native"


@pytest.mark.parametrize(
    ("extra", "warned"),
    [
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=checkout-load,team=perf"}, True),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=a", "OTEL_SERVICE_NAME": "a"}, False),
        ({"OTEL_RESOURCE_ATTRIBUTES": "team=perf"}, False),
    ],
)
def test_operator_native_pod_naming_its_service_only_in_attributes_is_warned_about(
    extra: dict[str, str], warned: bool
) -> None:
    """Left as the operator built it, such a pod reports as service 'locust': Locust replaces
    a service.name given in the resource attributes unless OTEL_SERVICE_NAME is set."""
    spec = otel(extraEnvVars=extra)
    m = run_mutation(operator_native("worker", spec), locusttest("demo", otel=spec))
    assert m.patch == [] and m.result.mode == "operator-native"
    named = [w for w in m.result.warnings if "OTEL_SERVICE_NAME" in w]
    assert len(named) == warned, m.result.warnings
    assert m.result.warnings == named
    if warned:
        assert "'locust'" in named[0] and "extraEnvVars" in named[0]


def test_operator_configuration_missing_a_variable_is_completed_and_enriched() -> None:
    spec = otel(insecure=True)
    pod = operator_native("worker", spec)
    env = pod["spec"]["containers"][0]["env"]
    env[:] = [e for e in env if e["name"] != "OTEL_EXPORTER_OTLP_INSECURE"]
    m = run_mutation(pod, locusttest("demo", otel=spec))
    assert m.result.mode == "otel"
    assert m.env_value("OTEL_EXPORTER_OTLP_INSECURE") == "true"
    assert m.env_value("OTEL_SERVICE_NAME") == "demo"
    assert m.container()["args"].count("--otel") == 1


def test_operator_variables_without_the_otel_flag_are_not_operator_native() -> None:
    pod = operator_native("worker", otel())
    pod["spec"]["containers"][0]["args"].remove("--otel")
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.result.mode == "otel"
    args = m.container()["args"]
    assert args.index("--otel") == args.index("--worker") - 1


def test_operator_configuration_missing_the_users_resource_attributes_is_completed() -> None:
    spec = otel(extraEnvVars={"OTEL_RESOURCE_ATTRIBUTES": "team=perf"})
    pod = operator_native("worker", spec)
    env = pod["spec"]["containers"][0]["env"]
    env[:] = [e for e in env if e["name"] != "OTEL_RESOURCE_ATTRIBUTES"]
    m = run_mutation(pod, locusttest("demo", otel=spec))
    assert m.result.mode == "otel"
    assert m.env_value("OTEL_RESOURCE_ATTRIBUTES").startswith("team=perf,")


def test_operator_configured_pod_with_an_exporter_sidecar_loses_the_sidecar() -> None:
    pod = operator_native("master", otel())
    pod["spec"]["containers"] += operator_pod("demo", "master", with_exporter=True)["spec"][
        "containers"
    ][1:]
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.result.mode == "otel"
    assert [c["name"] for c in m.pod["spec"]["containers"]] == ["demo-master"]
    assert m.env_value("OTEL_SERVICE_NAME") == "demo"


# --- Section 4.2: --otel ------------------------------------------------------------------


@pytest.mark.parametrize("role", ["master", "worker"])
def test_otel_flag_goes_before_the_mode_flag(role: str) -> None:
    m = run_mutation(operator_pod("demo", role), locusttest("demo", otel=otel()))
    args = m.container()["args"]
    assert args.count("--otel") == 1
    assert args.index("--otel") == args.index(f"--{role}") - 1
    assert args[:2] == ["--locustfile", "/lotest/src/locustfile.py"]


def test_otel_flag_goes_last_without_mode_flag() -> None:
    pod = operator_pod("demo", "worker")
    pod["spec"]["containers"][0]["args"] = ["--locustfile", "/lotest/src/locustfile.py"]
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.container()["args"][-1] == "--otel"


def test_args_are_created_when_missing() -> None:
    pod = operator_pod("demo", "worker")
    container = pod["spec"]["containers"][0]
    container.pop("args")
    container["command"] = ["locust", "--worker"]
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert {"op": "add", "path": "/spec/containers/0/args", "value": ["--otel"]} in m.patch


def test_a_container_without_command_or_args_keeps_its_images_cmd() -> None:
    # args alone would replace the image's CMD (its locustfile, --master...): the env switch.
    pod = operator_pod("demo", "master")
    container = pod["spec"]["containers"][0]
    container.pop("args")
    container.pop("command", None)
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert "args" not in m.container() and "command" not in m.container()
    assert not any(op["path"].endswith("/args") for op in m.patch)
    assert m.env_value("LOCUST_ENABLE_OPENTELEMETRY") == "true"
    assert m.result.role == "master"
    assert run_mutation(m.pod, locusttest("demo", otel=otel())).patch == []


def test_existing_otel_flag_is_kept_once() -> None:
    pod = operator_pod("demo", "worker", extra_args=["--otel"])
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.container()["args"].count("--otel") == 1


def test_shell_wrapped_locust_gets_the_env_switch_instead_of_the_flag() -> None:
    pod = operator_pod("demo", "worker")
    container = pod["spec"]["containers"][0]
    container["command"] = ["/bin/sh", "-c"]
    container["args"] = ["pip install faker && locust -f /lotest/src/locustfile.py --worker"]
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.container()["args"] == container["args"]
    assert m.env_value("LOCUST_ENABLE_OPENTELEMETRY") == "true"
    assert m.result.role == "worker"


@pytest.mark.parametrize(
    "command",
    [
        ["/bin/sh", "-ec"],
        ["bash", "-lc"],
        ["sh", "-e", "-c"],
        ["/usr/bin/env", "sh", "-c"],
        ["env", "-i", "LANG=C.UTF-8", "bash", "-o", "pipefail", "-c"],
        ["bash", "+x", "-c"],
        ["sh", "-c", "--"],
        ["tini", "--", "sh", "-c"],
        ["/usr/bin/dumb-init", "--", "bash", "-ec"],
        ["env", "-u", "HOME", "sh", "-c"],
    ],
)
def test_locust_behind_any_shell_c_form_gets_the_env_switch(command: list[str]) -> None:
    pod = operator_pod("demo", "worker")
    pod["metadata"]["labels"].pop("performance-test-pod-name")  # the role comes from the script
    container = pod["spec"]["containers"][0]
    container["command"] = command
    container["args"] = ["locust -f /lotest/src/locustfile.py --worker", "ignored-0"]
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.container()["args"] == container["args"]
    assert m.env_value("LOCUST_ENABLE_OPENTELEMETRY") == "true"
    assert m.result.role == "worker"


def test_shell_script_that_shlex_cannot_split_still_gets_the_env_switch() -> None:
    pod = operator_pod("demo", "worker")
    container = pod["spec"]["containers"][0]
    container["command"] = ["sh", "-c"]
    container["args"] = ["# don't edit\nlocust -f /lotest/src/locustfile.py --worker"]
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.container()["args"] == container["args"]
    assert m.env_value("LOCUST_ENABLE_OPENTELEMETRY") == "true"


def test_a_shell_named_after_locust_is_one_of_its_arguments() -> None:
    pod = operator_pod("demo", "worker")
    container = pod["spec"]["containers"][0]
    container["command"] = ["locust", "--tags", "sh", "-c", "--worker"]
    container.pop("args")
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.container()["args"] == ["--otel"]
    assert "LOCUST_ENABLE_OPENTELEMETRY" not in m.env_names()


def test_shell_running_a_script_file_is_not_a_shell_c() -> None:
    pod = operator_pod("demo", "worker")
    container = pod["spec"]["containers"][0]
    container["command"] = ["sh", "/docker-entrypoint.sh"]
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    args = m.container()["args"]
    assert args.index("--otel") == args.index("--worker") - 1
    assert "LOCUST_ENABLE_OPENTELEMETRY" not in m.env_names()


# --- Section 4.3: no exporter with OTel -----------------------------------------------------


def test_otel_removes_exporter_container_and_its_annotations() -> None:
    scrape = {
        "prometheus.io/scrape": "true",
        "prometheus.io/path": "/metrics",
        "prometheus.io/port": "9646",
        "team": "platform",
    }
    pod = operator_pod("demo", "master", with_exporter=True, annotations=scrape)
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    names = [c["name"] for c in m.pod["spec"]["containers"]]
    assert names == ["demo-master"]
    annotations = m.pod["metadata"]["annotations"]
    assert not any(k.startswith("prometheus.io/") for k in annotations)
    assert annotations["team"] == "platform"
    assert {"op": "remove", "path": "/spec/containers/1"} in m.patch
    assert {"op": "remove", "path": "/metadata/annotations/prometheus.io~1port"} in m.patch
    assert status(m.pod)["removed"][0] == "containers:locust-metrics-exporter"


def test_otel_removes_native_exporter_sidecar() -> None:
    exporter_only = run_mutation(operator_pod("demo", "master"), locusttest("demo")).pod
    m = run_mutation(exporter_only, locusttest("demo", otel=otel()))
    assert "initContainers" not in m.pod["spec"]
    assert {"op": "remove", "path": "/spec/initContainers"} in m.patch


def test_otel_keeps_scrape_annotations_aimed_elsewhere() -> None:
    own = {"prometheus.io/scrape": "true", "prometheus.io/port": "8089"}
    m = run_mutation(
        operator_pod("demo", "master", annotations=own), locusttest("demo", otel=otel())
    )
    assert m.pod["metadata"]["annotations"]["prometheus.io/port"] == "8089"


def test_otel_removes_scrape_annotations_aimed_at_the_exporter_port_without_a_sidecar() -> None:
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": "9646"}
    m = run_mutation(
        operator_pod("demo", "master", annotations=scrape), locusttest("demo", otel=otel())
    )
    assert not any(k.startswith("prometheus.io/") for k in m.pod["metadata"]["annotations"])
    assert status(m.pod)["removed"] == [
        "annotation:prometheus.io/scrape",
        "annotation:prometheus.io/port",
    ]


def test_otel_removes_scrape_annotations_aimed_at_an_exporter_on_another_port() -> None:
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": "9700"}
    pod = operator_pod("demo", "master", with_exporter=True, annotations=scrape)
    pod["spec"]["containers"][1]["ports"][0]["containerPort"] = 9700
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert not any(k.startswith("prometheus.io/") for k in m.pod["metadata"]["annotations"])


# --- Sections 4.4, 4.5: resource attributes and service name ------------------------------


def test_resource_attributes_merge_with_users_keys_winning() -> None:
    user = "service.name=checkout,k8s.namespace.name=custom,env=staging"
    test = locusttest(
        "team-a.load-test", "perf", otel=otel(extraEnvVars={"OTEL_RESOURCE_ATTRIBUTES": user})
    )
    m = run_mutation(operator_pod("team-a.load-test", "master"), test, namespace="perf")
    assert m.env_names()[-2:] == ["OTEL_RESOURCE_ATTRIBUTES_POD_NAME", "OTEL_RESOURCE_ATTRIBUTES"]
    assert m.env()[-2]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert m.env_value("OTEL_RESOURCE_ATTRIBUTES") == (
        "service.name=checkout,k8s.namespace.name=custom,env=staging,"
        "k8s.pod.name=$(OTEL_RESOURCE_ATTRIBUTES_POD_NAME),"
        "locust.test.name=team-a.load-test,locust.role=master"
    )


def test_resource_attributes_without_user_attributes() -> None:
    m = run_mutation(operator_pod("demo", "worker"), locusttest("demo", "ns1", otel=otel()), "ns1")
    assert m.env_value("OTEL_RESOURCE_ATTRIBUTES") == (
        "k8s.namespace.name=ns1,k8s.pod.name=$(OTEL_RESOURCE_ATTRIBUTES_POD_NAME),"
        "locust.test.name=demo,locust.role=worker"
    )


def test_enrichment_off_passes_user_attributes_through_last() -> None:
    test = locusttest(
        "demo",
        otel=otel(
            extraEnvVars={"OTEL_RESOURCE_ATTRIBUTES": "env=dev", "OTEL_TRACES_SAMPLER": "always_on"}
        ),
    )
    m = run_mutation(
        operator_pod("demo", "worker"), test, settings=MutationSettings(resource_attributes=False)
    )
    assert m.env_names()[-1] == "OTEL_RESOURCE_ATTRIBUTES"
    assert m.env_value("OTEL_RESOURCE_ATTRIBUTES") == "env=dev"
    assert "OTEL_RESOURCE_ATTRIBUTES_POD_NAME" not in m.env_names()


def test_pods_own_resource_attributes_are_left_alone() -> None:
    own = [{"name": "OTEL_RESOURCE_ATTRIBUTES", "value": "service.name=own"}]
    m = run_mutation(operator_pod("demo", "worker", env=own), locusttest("demo", otel=otel()))
    assert m.env_value("OTEL_RESOURCE_ATTRIBUTES") == "service.name=own"
    assert m.env_value("OTEL_SERVICE_NAME") == "own"


def test_pods_own_resource_attributes_from_value_from_get_no_pod_name_variable() -> None:
    # $(VAR) is expanded in `value` only: a valueFrom value cannot use the pod-name variable.
    source = {"configMapKeyRef": {"name": "otel", "key": "attributes"}}
    own = [{"name": "OTEL_RESOURCE_ATTRIBUTES", "valueFrom": source}]
    m = run_mutation(operator_pod("demo", "worker", env=own), locusttest("demo", otel=otel()))
    assert m.env()[0] == own[0]
    assert "OTEL_RESOURCE_ATTRIBUTES_POD_NAME" not in m.env_names()


def test_users_pod_name_attribute_needs_no_pod_name_variable() -> None:
    attributes = {"OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=custom"}
    m = run_mutation(
        operator_pod("demo", "worker"), locusttest("demo", otel=otel(extraEnvVars=attributes))
    )
    assert "OTEL_RESOURCE_ATTRIBUTES_POD_NAME" not in m.env_names()
    assert m.env_value("OTEL_RESOURCE_ATTRIBUTES") == (
        "k8s.pod.name=custom,k8s.namespace.name=default,locust.test.name=demo,locust.role=worker"
    )


def test_unknown_role_gets_no_role_attribute() -> None:
    pod = operator_pod("demo", "worker")
    pod["spec"]["containers"][0]["args"] = ["--locustfile", "/lotest/src/locustfile.py"]
    pod["metadata"]["labels"]["performance-test-pod-name"] = "demo-runner"
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.result.role == "unknown"
    assert "locust.role" not in m.env_value("OTEL_RESOURCE_ATTRIBUTES")


def test_users_attributes_are_trimmed_before_the_k8s_ones_are_appended() -> None:
    attributes = {"OTEL_RESOURCE_ATTRIBUTES": " ,env=dev, "}
    m = run_mutation(
        operator_pod("demo", "worker"), locusttest("demo", otel=otel(extraEnvVars=attributes))
    )
    assert m.env_value("OTEL_RESOURCE_ATTRIBUTES").startswith("env=dev,k8s.namespace.name=")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, "team-a.load-test"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,x=1"}, "from-attrs"),
        (
            {"OTEL_SERVICE_NAME": "explicit", "OTEL_RESOURCE_ATTRIBUTES": "service.name=x"},
            "explicit",
        ),
        # The SDK percent-decodes attribute values, not OTEL_SERVICE_NAME.
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=checkout%20api%2Cv2"}, "checkout api,v2"),
        # ... and strips keys and values.
        ({"OTEL_RESOURCE_ATTRIBUTES": "x=1, service.name = checkout "}, "checkout"),
    ],
)
def test_service_name(extra: dict[str, str], expected: str) -> None:
    test = locusttest("team-a.load-test", otel=otel(extraEnvVars=extra))
    m = run_mutation(operator_pod("team-a.load-test", "worker"), test)
    assert m.env_value("OTEL_SERVICE_NAME") == expected
    assert m.env_names().count("OTEL_SERVICE_NAME") == 1


# --- Section 4: the endpoint / protocol / insecure table -----------------------------------


@pytest.mark.parametrize(
    ("protocol", "endpoint", "extra", "insecure", "warned"),
    [
        ("grpc", "http://otel:4317", {}, False, None),
        ("grpc", "http://otel:4317", {}, True, None),
        ("grpc", "http://otel:4317", {"OTEL_EXPORTER_OTLP_INSECURE": "false"}, False, "TLS"),
        ("grpc", "otel:4317", {}, True, None),
        ("grpc", "otel:4317", {}, False, "no scheme"),
        ("grpc", "otel:4317", {"OTEL_EXPORTER_OTLP_INSECURE": "false"}, False, "no scheme"),
        ("grpc", "https://otel.example.com:4317", {}, False, None),
        ("http/protobuf", "http://otel:4318", {}, False, None),
        ("http/protobuf", "otel:4318", {}, False, "fails at once"),
        ("grpc", "http://otel:4318", {}, False, "4318"),
        ("http/protobuf", "http://otel:4317", {}, False, "4317"),
        ("grpc", "http://otel:4317", {"OTEL_EXPORTER_OTLP_INSECURE": "FALSE"}, False, "TLS"),
        ("grpc", "otel:4317", {"OTEL_EXPORTER_OTLP_INSECURE": "True"}, False, None),
        # The exporter's own reading: anything but "true" (any case, not stripped) is TLS.
        ("grpc", "http://otel:4317", {"OTEL_EXPORTER_OTLP_INSECURE": "0"}, False, "TLS"),
        ("grpc", "http://otel:4317", {"OTEL_EXPORTER_OTLP_INSECURE": "no"}, False, "TLS"),
        ("grpc", "otel:4317", {"OTEL_EXPORTER_OTLP_INSECURE": " true "}, False, "no scheme"),
        (
            "grpc",
            "http://otel:4318",
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            False,
            "http/json",
        ),
        # Set to '' is set: the exporter reads it, as TLS.
        ("grpc", "http://otel:4317", {"OTEL_EXPORTER_OTLP_INSECURE": ""}, False, "TLS"),
        # Locust's reading of the protocol: stripped, any case, "http" for http/protobuf.
        ("grpc", "http://otel:4317", {"OTEL_EXPORTER_OTLP_PROTOCOL": " GRPC "}, False, None),
        ("grpc", "http://otel:4318", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http"}, False, None),
        ("grpc", "http://otel:4317", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http"}, False, "4317"),
        ("grpc", "otel:4318", {"OTEL_EXPORTER_OTLP_PROTOCOL": "HTTP/protobuf"}, False, "at once"),
        ("grpc", "http://otel:4317", {"OTEL_EXPORTER_OTLP_PROTOCOL": ""}, False, "not supported"),
        # https:// makes both exporters verify the collector's certificate, insecure or not.
        ("grpc", "https://otel.example.com:4317", {}, True, "verify the collector"),
        ("http/protobuf", "https://otel.example.com:4318", {}, True, "verify the collector"),
        ("http/protobuf", "https://otel.example.com:4318", {}, False, None),
    ],
)
def test_endpoint_protocol_insecure_table(
    protocol: str, endpoint: str, extra: dict[str, str], insecure: bool, warned: str | None
) -> None:
    test = locusttest(
        "demo",
        otel={
            "enabled": True,
            "endpoint": endpoint,
            "protocol": protocol,
            "insecure": insecure,
            "extraEnvVars": extra,
        },
    )
    warnings = run_mutation(operator_pod("demo", "worker"), test).result.warnings
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0], warnings


KEPT = "which is kept over what the webhook would set"


def judged(m: Any) -> list[str]:
    """The warnings about the settings' effect, without the one saying the pod's own are kept
    (test_the_pods_own_otel_values_that_differ_are_said_to_be_kept)."""
    return [w for w in m.result.warnings if KEPT not in w]


def test_the_pods_own_otel_values_that_differ_are_said_to_be_kept() -> None:
    """The pod's own value wins (SPEC section 4), set by its template or by another webhook
    that ran first: say so when it hides the LocustTest's, and which of the resource
    attributes its own OTEL_RESOURCE_ATTRIBUTES goes without. Not for values equal to the
    LocustTest's, nor for the webhook's own output called again (reinvocation)."""
    test = locusttest("demo", otel=otel())
    own = [
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://other:4317"},
        {"name": "OTEL_TRACES_EXPORTER", "value": "otlp"},  # the same as the LocustTest's
        {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": "deployment.environment=prod"},
    ]
    m = run_mutation(operator_pod("demo", "worker", env=own), test)
    assert [w for w in m.result.warnings if KEPT in w] == [
        "LocustTest default/demo: the pod sets OTEL_EXPORTER_OTLP_ENDPOINT, "
        "OTEL_RESOURCE_ATTRIBUTES (without k8s.namespace.name, k8s.pod.name, locust.role, "
        f"locust.test.name) itself, {KEPT}"
    ]
    again = mutate(
        run_mutation(operator_pod("demo", "master"), test).pod,
        parse_locusttest(test),
        "default",
        MutationSettings(),
    )
    assert again.warnings == []


@pytest.mark.parametrize(
    ("name", "value", "asked"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", " GRPC", {}),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http", {"protocol": "http/protobuf"}),
        ("OTEL_EXPORTER_OTLP_INSECURE", "True", {"insecure": True}),
        ("OTEL_TRACES_EXPORTER", "OTLP", {}),
    ],
)
def test_the_pods_own_otel_value_read_the_same_way_is_not_said_to_be_kept(
    name: str, value: str, asked: dict[str, Any]
) -> None:
    """Locust reads the protocol and exporter names stripped and in any case ("http" for
    http/protobuf), the gRPC exporter `insecure` in any case: such a value hides nothing."""
    test = locusttest("demo", otel=otel(**asked))
    m = run_mutation(operator_pod("demo", "worker", env=[{"name": name, "value": value}]), test)
    assert [w for w in m.result.warnings if KEPT in w] == []


def test_the_kept_warning_tells_the_resource_attributes_apart_and_reads_empty_entries() -> None:
    """Attributes the LocustTest asks for with other values in the pod's own, and an env entry
    without value or valueFrom, which sets its variable to '' (an empty exporter: none)."""
    test = locusttest("demo", otel=otel(extraEnvVars={"OTEL_RESOURCE_ATTRIBUTES": "team=perf"}))
    own = [
        {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": "team=dev,locust.role=worker"},
        {"name": "OTEL_TRACES_EXPORTER"},
    ]
    m = run_mutation(operator_pod("demo", "worker", env=own), test)
    assert [w for w in m.result.warnings if KEPT in w] == [
        "LocustTest default/demo: the pod sets OTEL_TRACES_EXPORTER, OTEL_RESOURCE_ATTRIBUTES "
        "(without k8s.namespace.name, k8s.pod.name, locust.test.name; other values of team) "
        f"itself, {KEPT}"
    ]


@pytest.mark.parametrize(
    ("variable", "endpoint"),
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "otel:4317"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http://otel:4318"),
        ("OTEL_EXPORTER_OTLP_INSECURE", "otel:4317"),
    ],
)
def test_otel_setting_the_pod_takes_from_value_from_is_not_judged(
    variable: str, endpoint: str
) -> None:
    own = [{"name": variable, "valueFrom": {"configMapKeyRef": {"name": "otel", "key": "value"}}}]
    test = locusttest("demo", otel={"enabled": True, "endpoint": endpoint})
    m = run_mutation(operator_pod("demo", "worker", env=own), test)
    assert m.result.warnings == []


@pytest.mark.parametrize(
    ("entry", "endpoint", "warned"),
    [
        ({"name": "OTEL_EXPORTER_OTLP_INSECURE", "value": ""}, "http://otel:4317", "TLS"),
        ({"name": "OTEL_EXPORTER_OTLP_INSECURE"}, "http://otel:4317", "TLS"),
        ({"name": "OTEL_EXPORTER_OTLP_INSECURE", "value": "TRUE"}, "otel:4317", None),
        ({"name": "OTEL_EXPORTER_OTLP_PROTOCOL", "value": ""}, "http://otel:4317", "supported"),
        ({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": ""}, "http://otel:4317", "endpoint"),
    ],
)
def test_otel_setting_the_pod_sets_literally_is_judged_as_set(
    entry: dict[str, str], endpoint: str, warned: str | None
) -> None:
    """An env entry with an empty or no value sets the variable to '' (not unset)."""
    test = locusttest("demo", otel={"enabled": True, "endpoint": endpoint})
    warnings = judged(run_mutation(operator_pod("demo", "worker", env=[entry]), test))
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0], warnings


@pytest.mark.parametrize(
    ("first", "last", "warned"), [("true", "false", True), ("false", "true", False)]
)
def test_a_variable_the_pod_defines_twice_is_judged_by_its_last_value(
    first: str, last: str, warned: bool
) -> None:
    """The kubelet sets a name defined twice to its last value (the API server warns that it
    hides the previous one)."""
    own = [{"name": "OTEL_EXPORTER_OTLP_INSECURE", "value": v} for v in (first, last)]
    test = locusttest("demo", otel={"enabled": True, "endpoint": "http://otel:4317"})
    warnings = run_mutation(operator_pod("demo", "worker", env=own), test).result.warnings
    if warned:
        assert len(warnings) == 1 and "TLS" in warnings[0], warnings
    else:
        assert warnings == []


def test_the_last_of_twice_defined_variables_names_the_service_and_the_web_port() -> None:
    attributes = [
        {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": f"service.name={name}"}
        for name in ("hidden", "shown")
    ]
    test = locusttest("demo", otel=otel())
    m = run_mutation(operator_pod("demo", "worker", env=attributes), test)
    assert m.env_value("OTEL_SERVICE_NAME") == "shown"
    ports = [{"name": "LOCUST_WEB_PORT", "value": port} for port in ("8090", "8091")]
    m = run_mutation(operator_pod("demo", "master", env=ports), locusttest("demo"))
    assert m.pod["spec"]["initContainers"][0]["env"][0]["value"] == "http://localhost:8091"


@pytest.mark.parametrize("where", ["extraEnvVars", "pod"])
@pytest.mark.parametrize(
    "variable",
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        "OTEL_EXPORTER_OTLP_LOGS_INSECURE",
    ],
)
def test_otel_settings_overridden_per_signal_are_not_judged(variable: str, where: str) -> None:
    """The exporters (and Locust, for the protocol) read the per-signal variables first: the
    generic ones may not be what they use, so no verdict on them, not even a wrong one."""
    extra = {variable: "http://otel:4318"} if where == "extraEnvVars" else {}
    own = [{"name": variable, "value": "http://otel:4318"}] if where == "pod" else None
    test = locusttest(
        "demo",
        otel={
            "enabled": True,
            "endpoint": "otel:4317",  # no scheme, not insecure: warned when judged
            "extraEnvVars": {**extra, "OTEL_RESOURCE_ATTRIBUTES": "service.version=2"},
        },
    )
    warnings = run_mutation(operator_pod("demo", "worker", env=own), test).result.warnings
    assert len(warnings) == 1 and "service.version" in warnings[0], warnings


# --- Section 5: exporter sidecar ----------------------------------------------------------


def test_master_gets_native_exporter_sidecar_and_scrape_annotations() -> None:
    m = run_mutation(operator_pod("demo", "master"), locusttest("demo"))
    [sidecar] = m.pod["spec"]["initContainers"]
    assert sidecar["name"] == "locust-metrics-exporter"
    assert sidecar["image"] == "containersol/locust_exporter:v0.5.0"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["env"] == [
        {"name": "LOCUST_EXPORTER_URI", "value": "http://localhost:8089"},
        {"name": "LOCUST_EXPORTER_WEB_LISTEN_ADDRESS", "value": ":9646"},
    ]
    assert sidecar["ports"][0]["containerPort"] == 9646
    assert sidecar["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }
    annotations = m.pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == "9646"
    assert status(m.pod)["mode"] == "exporter"
    assert m.pod["spec"]["containers"] == m.sent["spec"]["containers"]


def test_container_mode_and_configured_exporter() -> None:
    settings = MutationSettings(
        sidecar_mode="container",
        exporter_image="registry.local/exporter:1",
        exporter_port=9700,
        exporter_pull_policy="Always",
        exporter_cpu_limit="200m",
        exporter_memory_limit="",
    )
    m = run_mutation(operator_pod("demo", "master"), locusttest("demo"), settings=settings)
    sidecar = m.pod["spec"]["containers"][-1]
    assert "initContainers" not in m.pod["spec"]
    assert "restartPolicy" not in sidecar
    assert sidecar["image"] == "registry.local/exporter:1"
    assert sidecar["imagePullPolicy"] == "Always"
    assert sidecar["resources"] == {
        "requests": {"cpu": "10m", "memory": "32Mi"},
        "limits": {"cpu": "200m"},
    }
    assert m.pod["metadata"]["annotations"]["prometheus.io/port"] == "9700"
    assert {"name": "LOCUST_EXPORTER_WEB_LISTEN_ADDRESS", "value": ":9700"} in sidecar["env"]
    assert [port["containerPort"] for port in sidecar["ports"]] == [9700]


@pytest.mark.parametrize(
    "args", [["--web-port", "8090"], ["--web-port=8090"], ["-P", "8090"], ["-P8090"]]
)
def test_exporter_follows_web_port(args: list[str]) -> None:
    m = run_mutation(operator_pod("demo", "master", extra_args=args), locusttest("demo"))
    uri = m.pod["spec"]["initContainers"][0]["env"][0]["value"]
    assert uri == "http://localhost:8090"


def test_exporter_follows_locust_web_port_env() -> None:
    pod = operator_pod("demo", "master", env=[{"name": "LOCUST_WEB_PORT", "value": "8090"}])
    m = run_mutation(pod, locusttest("demo"))
    uri = m.pod["spec"]["initContainers"][0]["env"][0]["value"]
    assert uri == "http://localhost:8090"


@pytest.mark.parametrize("args", [["--web-port", "0"], ["--web-port", "99999"], ["--web-port"]])
def test_exporter_uses_the_default_web_port_when_the_given_one_is_unusable(
    args: list[str],
) -> None:
    pod = operator_pod("demo", "master")
    pod["spec"]["containers"][0]["args"] += args
    m = run_mutation(pod, locusttest("demo"))
    uri = m.pod["spec"]["initContainers"][0]["env"][0]["value"]
    assert uri == "http://localhost:8089"


@pytest.mark.parametrize(
    ("configured", "expected"),
    [
        (
            MutationSettings(exporter_memory_limit=""),
            {"requests": {"cpu": "10m", "memory": "32Mi"}},
        ),
        (
            MutationSettings(
                exporter_cpu_request="", exporter_memory_request="", exporter_memory_limit=""
            ),
            {},
        ),
    ],
)
def test_blank_exporter_resources_are_left_out(
    configured: MutationSettings, expected: dict[str, Any]
) -> None:
    m = run_mutation(operator_pod("demo", "master"), locusttest("demo"), settings=configured)
    assert m.pod["spec"]["initContainers"][0]["resources"] == expected


def test_exporter_is_not_added_twice_to_v1_operator_pods() -> None:
    pod = operator_pod("demo", "master", with_exporter=True)
    m = run_mutation(pod, locusttest("demo", version="v1"))
    assert "initContainers" not in m.pod["spec"]
    assert [c["name"] for c in m.pod["spec"]["containers"]].count("locust-metrics-exporter") == 1


def test_pods_own_scrape_annotations_win_with_a_warning() -> None:
    own = {"prometheus.io/scrape": "true", "prometheus.io/port": "8089"}
    m = run_mutation(operator_pod("demo", "master", annotations=own), locusttest("demo"))
    annotations = m.pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8089"
    assert "prometheus.io/path" not in annotations
    assert any("8089" in w for w in m.result.warnings)


def istio_master(merged: dict[str, str] | None) -> dict[str, Any]:
    """A master pod as Istio's injector leaves it before this webhook (it runs first: its
    configuration's name sorts first), with metrics merging on: prometheus.io/* aimed at its
    agent, the pod's own scrape settings (if any) in the proxy's environment."""
    own = {
        "prometheus.io/scrape": "true",
        "prometheus.io/path": "/stats/prometheus",
        "prometheus.io/port": "15020",
    }
    pod = operator_pod("demo", "master", annotations=own)
    env = [{"name": "ISTIO_PROMETHEUS_ANNOTATIONS", "value": json.dumps(merged)}] if merged else []
    proxy = {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.24.0", "env": env}
    pod["spec"]["containers"].insert(0, proxy)
    return pod


def test_istio_metrics_merging_that_leaves_out_the_exporter_says_how_to_bring_it_in() -> None:
    m = run_mutation(istio_master(None), locusttest("demo"))
    assert m.pod["metadata"]["annotations"]["prometheus.io/port"] == "15020"
    assert m.result.warnings == [
        "Istio merges the pod's metrics at prometheus.io/port='15020' without the metrics "
        "exporter on port 9646: set prometheus.io/scrape 'true', prometheus.io/path '/metrics' "
        "and prometheus.io/port '9646' in the LocustTest's master annotations, which Istio's "
        "injector then merges"
    ]
    # Done so: Istio scrapes the exporter and serves its metrics with its own.
    merged = {"scrape": "true", "path": "/metrics", "port": "9646"}
    assert run_mutation(istio_master(merged), locusttest("demo")).result.warnings == []
    # With merging off, Istio leaves the pod's own annotations alone: the plain warning.
    pod = istio_master(None)
    pod["metadata"]["annotations"].update(
        {"prometheus.io/path": "/metrics", "prometheus.io/port": "8089"}
    )
    [warning] = run_mutation(pod, locusttest("demo")).result.warnings
    assert warning.startswith("the pod sets prometheus.io/port='8089' itself")


def test_pods_own_scrape_port_of_the_exporter_gets_no_warning() -> None:
    own = {"prometheus.io/port": "9646"}
    m = run_mutation(operator_pod("demo", "master", annotations=own), locusttest("demo"))
    assert m.result.warnings == []


def test_worker_without_otel_is_untouched() -> None:
    m = run_mutation(operator_pod("demo", "worker"), locusttest("demo"))
    assert m.patch == []
    assert m.result.mode == "none"


def test_v1_locusttest_means_exporter() -> None:
    m = run_mutation(operator_pod("demo", "master"), locusttest("demo", version="v1"))
    assert m.result.mode == "exporter"
    assert m.pod["spec"]["initContainers"][0]["name"] == "locust-metrics-exporter"


def test_disabled_otel_leaves_pods_otel_settings_alone() -> None:
    own = [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://x:4317"}]
    pod = operator_pod("demo", "master", env=own, extra_args=["--otel"])
    m = run_mutation(pod, locusttest("demo", otel={"enabled": False, "endpoint": ENDPOINT}))
    assert m.env() == own
    assert "--otel" in m.container()["args"]


# --- Section 6: idempotency, minimal patches, status, opt-out ------------------------------


def test_patch_is_minimal_for_an_otel_worker() -> None:
    m = run_mutation(operator_pod("demo", "worker"), locusttest("demo", otel=otel()))
    assert [(op["op"], op["path"]) for op in m.patch] == [
        ("add", "/metadata/annotations"),
        ("add", "/spec/containers/0/args/2"),
        ("add", "/spec/containers/0/env"),
    ]


def test_env_is_appended_item_by_item_when_present() -> None:
    own = [{"name": "TARGET_HOST", "value": "https://api.example.com"}]
    m = run_mutation(operator_pod("demo", "worker", env=own), locusttest("demo", otel=otel()))
    env_ops = [op for op in m.patch if "/env" in op["path"]]
    assert env_ops == [
        {"op": "add", "path": "/spec/containers/0/env/-", "value": entry} for entry in m.env()[1:]
    ]
    assert len(env_ops) > 1


def test_annotation_keys_are_escaped_when_annotations_exist() -> None:
    m = run_mutation(operator_pod("demo", "master", annotations={"a/b~c": "1"}), locusttest("demo"))
    paths = {op["path"] for op in m.patch}
    assert "/metadata/annotations/prometheus.io~1scrape" in paths
    assert "/metadata/annotations/observability.locust.io~1status" in paths


def test_status_annotation_records_what_was_done() -> None:
    m = run_mutation(operator_pod("demo", "worker"), locusttest("demo", otel=otel()))
    recorded = status(m.pod)
    assert recorded["mode"] == "otel"
    assert recorded["container"] == "demo-worker"
    assert "arg:--otel" in recorded["added"]
    assert "env:OTEL_TRACES_EXPORTER" in recorded["added"]


def test_status_annotation_records_a_removal_when_nothing_was_added() -> None:
    extra = {"OTEL_SERVICE_NAME": "checkout", "OTEL_RESOURCE_ATTRIBUTES": "team=perf"}
    pod = operator_native("master", otel(extraEnvVars=extra))
    pod["spec"]["containers"] += operator_pod("demo", "master", with_exporter=True)["spec"][
        "containers"
    ][1:]
    m = run_mutation(pod, locusttest("demo", otel=otel(extraEnvVars=extra)))
    assert status(m.pod) == {
        "mode": "otel",
        "container": "demo-master",
        "role": "master",
        "added": [],
        "removed": ["containers:locust-metrics-exporter"],
    }


# The README shows "false"; any case and surrounding blanks are read the same way.
@pytest.mark.parametrize("value", ["false", "False", " FALSE "])
def test_opt_out_annotation(value: str) -> None:
    pod = operator_pod("demo", "master", annotations={"observability.locust.io/inject": value})
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.patch == []
    assert m.result.mode == "opted-out"


def test_an_opted_out_pod_is_returned_as_it_is_whatever_its_containers() -> None:
    """As the server skips it before reading the pod: no container to inject into, or no spec
    at all, is not an error for a pod that asked not to be touched."""
    annotations = {"observability.locust.io/inject": "false"}
    sidecars_only = operator_pod("demo", "master", annotations=annotations)
    sidecars_only["spec"]["containers"] = [{"name": "istio-proxy", "image": "istio/proxyv2"}]
    no_spec = operator_pod("demo", "master", annotations=annotations)
    del no_spec["spec"]
    test = parse_locusttest(locusttest("demo", otel=otel()))
    for pod in (sidecars_only, no_spec):
        result = mutate(pod, test, "default", MutationSettings())
        assert result.pod is pod and result.mode == "opted-out"


def test_owner_references_that_are_not_a_list_are_not_an_internal_error() -> None:
    """Only a hand-made review sends them (the API server decodes the Pod first); the Job's
    name is then read from the Job controller's label."""
    pod = operator_pod("demo", "worker")
    pod["metadata"]["ownerReferences"] = 5
    pod["metadata"]["labels"]["batch.kubernetes.io/job-name"] = "other"
    result = mutate(pod, parse_locusttest(locusttest("demo")), "default", MutationSettings())
    assert result.mode == "none"
    assert "owning Job 'other' is not 'demo-worker'" in result.notes[0]


def test_job_name_mismatch_is_noted() -> None:
    pod = operator_pod("team.a", "master")
    m = run_mutation(pod, locusttest("team.a"))
    assert m.result.notes == []
    pod["metadata"]["ownerReferences"][0]["name"] = "something-else"
    m = run_mutation(pod, locusttest("team.a"))
    assert "team-a-master" in m.result.notes[0]


def test_unknown_role_is_not_checked_against_a_job_name() -> None:
    pod = operator_pod("demo", "master")
    pod["spec"]["containers"][0]["args"] = ["--locustfile", "/lotest/src/locustfile.py"]
    pod["metadata"]["labels"]["performance-test-pod-name"] = "demo-runner"
    m = run_mutation(pod, locusttest("demo"))
    assert m.result.role == "unknown"
    assert m.result.notes == []


def test_long_job_name_is_shortened_in_the_note() -> None:
    pod = operator_pod("demo", "master")
    pod["metadata"]["ownerReferences"][0]["name"] = "x" * 300
    [note] = run_mutation(pod, locusttest("demo")).result.notes
    assert "x" * 80 + "..." in note
    assert "x" * 81 not in note


def test_owner_that_is_not_a_job_is_not_taken_for_the_job() -> None:
    pod = operator_pod("demo", "master")
    workflow = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "name": "nightly"}
    pod["metadata"]["ownerReferences"].insert(0, {**workflow, "uid": "1"})
    assert run_mutation(pod, locusttest("demo")).result.notes == []


def test_job_name_label_is_read_without_owner_references() -> None:
    pod = operator_pod("demo", "master")
    del pod["metadata"]["ownerReferences"]
    del pod["metadata"]["labels"]["job-name"]
    pod["metadata"]["labels"]["batch.kubernetes.io/job-name"] = "something-else"
    [note] = run_mutation(pod, locusttest("demo")).result.notes
    assert "'something-else'" in note


def test_service_version_in_resource_attributes_is_warned_about() -> None:
    attributes = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=svc,service.version=1.0.0"}
    m = run_mutation(
        operator_pod("demo", "worker"), locusttest("demo", otel=otel(extraEnvVars=attributes))
    )
    assert len(m.result.warnings) == 1
    assert "service.version" in m.result.warnings[0]


@pytest.mark.parametrize(
    ("image", "warned"),
    [
        ("locustio/locust:2.20.0", "2.20.0 has no OpenTelemetry support"),
        ("locustio/locust:2.42.3", "has no OpenTelemetry support"),
        ("registry.example.com:5000/locustio/locust:2.40.0", "has no OpenTelemetry support"),
        ("locustio/locust:2.42.4", "has no OpenTelemetry SDK"),  # --otel, but no SDK
        ("locustio/locust:2.43.4-python3.12", "has no OpenTelemetry SDK"),
        ("locustio/locust:2.47.0", "has no OpenTelemetry SDK"),
        ("docker.io/locustio/locust:2.43.1", "has no OpenTelemetry SDK"),
        ("locustio/locust", "has no OpenTelemetry SDK"),
        ("locustio/locust@sha256:" + "0" * 64, "has no OpenTelemetry SDK"),
        ("locustio/locust-otel:2.47.0", None),
        ("registry.example.com:5000/perf/locust:1.0", None),
    ],
)
def test_a_locust_image_that_cannot_export_is_warned_about(image: str, warned: str | None) -> None:
    """Locust knows --otel since 2.42.4, and the locustio/locust image lacks the SDK
    (locust[otel]): Locust would export nothing, or stop at --otel."""
    pod = operator_pod("demo", "worker", image=image)
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert m.patch != []  # warned, still injected as the LocustTest asks
    about_image = [w for w in m.result.warnings if image in w]
    if warned is None:
        assert m.result.warnings == []
    else:
        assert len(about_image) == 1 and warned in about_image[0], m.result.warnings
        assert "locustio/locust-otel" in about_image[0]


@pytest.mark.parametrize("endpoint", ["http://[collector:4317", "http://coll\uff03ector:4317"])
def test_an_endpoint_that_is_not_a_url_is_warned_about_not_an_internal_error(
    endpoint: str,
) -> None:
    own = [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": endpoint}]
    m = run_mutation(operator_pod("demo", "worker", env=own), locusttest("demo", otel=otel()))
    assert m.patch != []
    [warning] = judged(m)
    assert f"endpoint {endpoint!r} is not a URL (" in warning


def test_a_long_value_is_cut_where_a_warning_quotes_it_and_its_verdict_not_remembered() -> None:
    from webhook.mutation import otel as otel_module

    endpoint = "collector-" + "x" * 1_000_000 + ":4317"  # no scheme: warned about
    own = [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": endpoint}]
    remembered = otel_module._warnings.cache_info().currsize
    m = run_mutation(operator_pod("demo", "worker", env=own), locusttest("demo", otel=otel()))
    [warning] = judged(m)
    assert "has no scheme" in warning and len(warning) < 500
    assert all(len(w) < 500 for w in m.result.warnings)
    assert repr(endpoint[:100]) + "..." in warning
    assert otel_module._warnings.cache_info().currsize == remembered


@pytest.mark.parametrize("port", ["\u00b2", "\u00b9\u00b2\u00b3"])  # digits int() refuses
def test_a_web_port_of_digits_int_cannot_read_is_the_default(port: str) -> None:
    pod = operator_pod("demo", "master", env=[{"name": "LOCUST_WEB_PORT", "value": port}])
    m = run_mutation(pod, locusttest("demo"))
    [exporter] = m.pod["spec"]["initContainers"]
    assert {"name": "LOCUST_EXPORTER_URI", "value": "http://localhost:8089"} in exporter["env"]


def test_the_plain_locust_image_is_not_warned_about_without_opentelemetry() -> None:
    pod = operator_pod("demo", "master", image="locustio/locust:2.20.0")
    m = run_mutation(pod, locusttest("demo"))
    assert m.result.mode == "exporter" and m.result.warnings == []


# --- Section 7: malformed pods are skipped, not internal errors -----------------------------


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.containers", None),
        ("spec.containers", []),
        ("spec.containers.0.command", ["locust", 5]),
        ("spec.containers.0.args", "--worker"),
        ("metadata.annotations", {"team": 5}),
        ("spec.containers.0.env", [{"value": "x"}]),
    ],
)
def test_malformed_pod_is_refused_as_malformed(path: str, value: Any) -> None:
    pod = operator_pod("demo", "worker")
    *parents, last = path.split(".")
    node: Any = pod
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    with pytest.raises(MalformedPod):
        mutate(
            pod, parse_locusttest(locusttest("demo", otel=otel())), "default", MutationSettings()
        )


@pytest.mark.parametrize("env_from", [[], [{"configMapRef": {"name": "shop-settings"}}]])
def test_variables_the_webhook_cannot_see_in_env_from_are_warned_about(
    env_from: list[dict[str, Any]],
) -> None:
    """The kubelet lets env override envFrom: an OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES
    from a ConfigMap would be replaced by the ones injected, which the webhook cannot avoid
    (it does not read ConfigMaps), so it says so."""
    pod = operator_pod("demo", "master")
    pod["spec"]["containers"][0]["envFrom"] = env_from
    m = run_mutation(pod, locusttest("demo", otel=otel()))
    assert "OTEL_SERVICE_NAME" in json.dumps(m.patch)
    if env_from:
        [warning] = m.result.warnings
        assert "from envFrom, which the webhook cannot read" in warning
        assert "extraEnvVars" in warning
    else:
        assert m.result.warnings == []


def test_env_from_is_not_warned_about_when_nothing_is_added_to_env() -> None:
    pod = operator_pod("demo", "master")
    pod["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"name": "api-keys"}}]
    done = run_mutation(pod, locusttest("demo", otel=otel())).pod
    again = run_mutation(done, locusttest("demo", otel=otel()))
    assert again.patch == [] and again.result.warnings == []
    sidecar = run_mutation(pod, locusttest("demo"))  # exporter mode: env is not touched
    assert sidecar.result.warnings == []


@pytest.mark.parametrize(
    ("endpoint", "shown"),
    [
        ("alice:s3cret@collector.example:4318", "'***@collector.example:4318' has no scheme"),
        ("http://alice:s3cret@coll\uff03ector:4317", "'http://***@coll\uff03ector:4317' is not"),
    ],
)
def test_credentials_in_an_endpoint_are_masked_in_warnings(endpoint: str, shown: str) -> None:
    """Warnings reach the log and whoever created the pod: a collector's user:password@ is
    not quoted, in the endpoint nor in the URL parser's message."""
    test = locusttest("demo", otel=otel(endpoint=endpoint, protocol="http/protobuf"))
    m = run_mutation(operator_pod("demo", "worker"), test)
    [warning] = m.result.warnings
    assert shown in warning
    assert "s3cret" not in warning


def test_values_from_the_pod_are_cut_in_warnings() -> None:
    """A pod may carry megabytes in an annotation or an image tag: a warning quoting it is cut
    (the log line stays one pipe write)."""
    pod = operator_pod("demo", "master", annotations={"prometheus.io/port": "9" * 1_000_000})
    [port_warning] = run_mutation(pod, locusttest("demo")).result.warnings
    image = "locustio/locust:2.0.0" + "1" * 1_000_000
    otel_pod = operator_pod("demo", "worker", image=image)
    [image_warning] = run_mutation(otel_pod, locusttest("demo", otel=otel())).result.warnings
    assert "Locust 2.0.0" in image_warning
    assert len(port_warning) < 400 and len(image_warning) < 600
