"""Real Locust with exactly what the webhook injected, checked at an OTLP receiver (issue 4).

Operator-shaped master and worker pods go through the running webhook over HTTPS as the API
server sends them; the returned JSON patches are applied; `kubelet.py` names the pods and turns
each Locust container into a process environment and argv the way the kubelet would. Only what
exists only in a cluster is substituted: the locustfile path, the target host, and the master's
host and ports (mapped onto dynamic loopback ports, as a pod network namespace would). The test
adds `--json-file` to the master to read Locust's own stats. It then asserts on what reached the
receiver — never on exit codes, since Locust exits 0 when every export fails.

All scenarios run concurrently in one module fixture (each has its own receiver and target);
every test asserts on its scenario's outcome.
"""

from __future__ import annotations

import base64
import copy
import json
import shlex
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fixtures
import jsonpatch
import kubelet
import pytest
import yaml
from e2e_support import Process, TargetServer, free_port, get_json, processes, wait_until
from otlp_receiver import OtlpReceiver, latest_cumulative
from server_process import Server, serve

NAMESPACE = "loadtests"
LOCUST = str(Path(sys.executable).parent / "locust")
LOCUSTFILE = Path(__file__).parent / "e2e" / "locustfile.py"
# what only exists in a cluster (the operator mounts the ConfigMap at /lotest/src)
CLUSTER_LOCUSTFILE = "/lotest/src/locustfile.py"
CLUSTER_TARGET = "http://shop.shop-system.svc:8080"
IMAGE = "locustio/locust-otel:2.47.0"
MASTER_PORT = 5557
PROCESS_CAP = 90.0  # seconds any Locust process may live, whatever happens
# locust.runners.MASTER_HEARTBEAT_TIMEOUT: how long a worker waits for the master's heartbeats
# before it quits (importing locust here would monkey-patch this process with gevent)
LOCUST_MASTER_HEARTBEAT_TIMEOUT = 60

# users, spawn rate and run time come from the LocustTest, as in a cluster; --stop-timeout lets
# users finish the request in flight at the end, so Locust's stats and the spans count the same
USERS = 5
LOAD = f"--users {USERS} --spawn-rate {USERS} --run-time 3s --stop-timeout 2"
SPAN_ERROR = 2  # OTLP Status.code
EXPORT_EVERY_SECOND = {"OTEL_METRIC_EXPORT_INTERVAL": "1000"}


# ---------------------------------------------------------------- fixtures after the operator


def locusttest(name: str, *, master: str, otel: dict[str, Any] | None = None) -> dict[str, Any]:
    """A locust.io/v2 LocustTest in the shape of the operator's samples."""
    spec: dict[str, Any] = {
        "image": IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "master": {"command": master},
        "worker": {"command": f"--locustfile {CLUSTER_LOCUSTFILE}", "replicas": 1},
        "testFiles": {"configMapRef": f"{name.replace('.', '-')}-scripts"},
    }
    if otel is not None:
        spec["observability"] = {"openTelemetry": otel}
    return {
        "apiVersion": "locust.io/v2",
        "kind": "LocustTest",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


def operator_pod(test: dict[str, Any], role: str) -> dict[str, Any]:
    """The pod the Job controller submits for the operator's master or worker Job."""
    spec = test["spec"]
    return fixtures.operator_pod(
        test["metadata"]["name"],
        role,
        command=shlex.split(spec[role]["command"]),
        workers=spec["worker"]["replicas"],
        image=spec["image"],
        config_map=spec["testFiles"]["configMapRef"],
    )


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    test: dict[str, Any]
    # what the user writes for the collector, given the receiver (None: OTel off)
    collector: Callable[[OtlpReceiver], dict[str, Any]] | None = None
    # whether the SPEC says this configuration can reach a plaintext collector
    delivers: bool = True

    @property
    def name(self) -> str:
        return str(self.test["metadata"]["name"])

    @property
    def service(self) -> str:
        """The master's Service, which the operator names like its Job."""
        return f"{self.name.replace('.', '-')}-master"


def otel(endpoint: Callable[[OtlpReceiver], str], **fields: Any) -> Callable[..., Any]:
    return lambda receiver: {"enabled": True, "endpoint": endpoint(receiver), **fields}


SCENARIOS = {
    # a dotted name, as the SPEC allows; service.name only inside the user's attributes
    "grpc": Scenario(
        locusttest(
            "shop.grpc", master=f"--locustfile {CLUSTER_LOCUSTFILE} --host {CLUSTER_TARGET} {LOAD}"
        ),
        otel(
            lambda r: f"http://{r.grpc_endpoint}",
            protocol="grpc",
            extraEnvVars={
                "OTEL_RESOURCE_ATTRIBUTES": "service.name=checkout-load,"
                "deployment.environment=e2e,team=platform",
                **EXPORT_EVERY_SECOND,
            },
        ),
    ),
    "grpc-insecure": Scenario(
        locusttest(
            "shop-grpc-insecure",
            master=f"--locustfile {CLUSTER_LOCUSTFILE} --host {CLUSTER_TARGET} {LOAD}",
        ),
        otel(
            lambda r: r.grpc_endpoint,
            protocol="grpc",
            insecure=True,
            extraEnvVars={"OTEL_SERVICE_NAME": "insecure-load", **EXPORT_EVERY_SECOND},
        ),
    ),
    "http": Scenario(
        locusttest(
            "shop-http", master=f"--locustfile {CLUSTER_LOCUSTFILE} --host {CLUSTER_TARGET} {LOAD}"
        ),
        otel(
            lambda r: f"http://{r.http_endpoint}",
            protocol="http/protobuf",
            extraEnvVars={
                "OTEL_SERVICE_NAME": "shop-http-load",
                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=e2e,team=platform",
                "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
                **EXPORT_EVERY_SECOND,
            },
        ),
    ),
    # SPEC table: grpc, no scheme, insecure unset -> the exporter speaks TLS to a plaintext
    # collector and nothing arrives
    "grpc-no-scheme": Scenario(
        locusttest(
            "shop-grpc-tls",
            master=f"--locustfile {CLUSTER_LOCUSTFILE} --host {CLUSTER_TARGET} {LOAD}",
        ),
        otel(lambda r: r.grpc_endpoint, protocol="grpc", extraEnvVars=EXPORT_EVERY_SECOND),
        delivers=False,
    ),
    "exporter": Scenario(
        locusttest(
            "shop-exporter",
            master=f"--locustfile {CLUSTER_LOCUSTFILE} --host {CLUSTER_TARGET} "
            "--users 2 --spawn-rate 2 --run-time 60s",
        )
    ),
    "exporter-web-port": Scenario(
        locusttest(
            "shop-exporter-web-port",
            master=f"--locustfile {CLUSTER_LOCUSTFILE} --host {CLUSTER_TARGET} "
            "--users 2 --spawn-rate 2 --run-time 60s --web-port 8090",
        )
    ),
}


@dataclass
class Admitted:
    """A pod through the webhook and the API server, as the kubelet gets it."""

    sent: dict[str, Any]
    response: dict[str, Any]  # the AdmissionReview's response
    pod: dict[str, Any]  # patched, named and scheduled

    @property
    def warnings(self) -> list[str]:
        return list(self.response.get("warnings") or [])

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def container_name(self) -> str:
        return str(self.sent["spec"]["containers"][0]["name"])

    def env(self, container: str | None = None) -> dict[str, str]:
        return kubelet.container_env(self.pod, container or self.container_name)

    def argv(self) -> list[str]:
        return kubelet.container_argv(self.pod, self.container_name, self.env(), [LOCUST])


@dataclass
class Outcome:
    scenario: Scenario
    receiver: OtlpReceiver
    master: Admitted
    worker: Admitted
    master_argv: list[str] = field(default_factory=list)
    worker_argv: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)  # Locust's --json-file, by name
    hits: Counter[str] = field(default_factory=Counter)  # what the target served
    logs: dict[str, str] = field(default_factory=dict)
    # exporter mode
    exporter_uri: str = ""
    web_port: int = 0
    scraped: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.stats.values())

    def explain(self) -> str:
        return "\n".join(f"--- {name}\n{text[-3000:]}" for name, text in self.logs.items())


def admit(server: Server, pod: dict[str, Any]) -> Admitted:
    """POST the review over HTTPS, check the envelope, apply the patch strictly, create the pod."""
    response = server.admit(pod, NAMESPACE, timeout=10)
    assert response["allowed"] is True
    patched = copy.deepcopy(pod)
    if "patch" in response:
        assert response["patchType"] == "JSONPatch"
        operations = json.loads(base64.b64decode(response["patch"]))
        patched = jsonpatch.JsonPatch(operations).apply(patched)
    return Admitted(pod, response, kubelet.create_pod(patched, NAMESPACE))


def substitute(argv: list[str], replacements: dict[str, str]) -> list[str]:
    """Swap cluster-only values; each must occur exactly once, or the pod is not what we think."""
    for old in replacements:
        assert argv.count(old) == 1, f"{old!r} occurs {argv.count(old)} times in {argv}"
    return [replacements.get(arg, arg) for arg in argv]


def web_port_of(argv: list[str]) -> int:
    """The port Locust's web UI listens on, read from its args as Locust reads them."""
    for index, arg in enumerate(argv):
        if arg == "--web-port":
            return int(argv[index + 1])
        if arg.startswith("--web-port="):
            return int(arg.split("=", 1)[1])
    return 8089


def read_json(stem: Path) -> list[dict[str, Any]] | None:
    """Locust's --json-file output (it appends .json), once it is completely written."""
    try:
        return list(json.loads(Path(f"{stem}.json").read_text()))
    except (OSError, ValueError):
        return None


def drop_option(argv: list[str], option: str) -> list[str]:
    """argv without `option` and its value (`--opt value` or `--opt=value`)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            kept.append(arg)
    return kept


def process_env(admitted: Admitted, home: Path) -> dict[str, str]:
    """What the container runtime gives the process: the image's basics, HOSTNAME, the pod env."""
    return {
        "PATH": f"{Path(LOCUST).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "HOSTNAME": admitted.name,
        **admitted.env(),
    }


def aggregated(stats: dict[str, Any]) -> int:
    return next(int(s["num_requests"]) for s in stats["stats"] if s["name"] == "Aggregated")


def run_load_test(scenario: Scenario, server: Server, receiver: OtlpReceiver, tmp: Path) -> Outcome:
    """Master and worker from the webhook's pods; returns once both have exited."""
    target = TargetServer()
    master = admit(server, operator_pod(scenario.test, "master"))
    worker = admit(server, operator_pod(scenario.test, "worker"))
    outcome = Outcome(scenario, receiver, master, worker)
    bind_port, web_port = free_port(), free_port()
    json_file = tmp / "master-stats"
    outcome.master_argv = [
        *substitute(
            master.argv(), {CLUSTER_LOCUSTFILE: str(LOCUSTFILE), CLUSTER_TARGET: target.url}
        ),
        # the pod's network namespace, on loopback: the master binds 5557 and serves 8089
        "--master-bind-host=127.0.0.1",
        f"--master-bind-port={bind_port}",
        "--web-host=127.0.0.1",
        f"--web-port={web_port}",
        # how the test reads Locust's own stats
        f"--json-file={json_file}",
    ]
    outcome.worker_argv = substitute(
        worker.argv(),
        {
            CLUSTER_LOCUSTFILE: str(LOCUSTFILE),
            f"--master-host={scenario.service}": "--master-host=127.0.0.1",
            f"--master-port={MASTER_PORT}": f"--master-port={bind_port}",
        },
    )
    web = f"http://127.0.0.1:{web_port}/stats/requests"
    try:
        with processes(tmp, PROCESS_CAP) as group:
            locust_master = group.start("master", outcome.master_argv, process_env(master, tmp))
            # the worker would retry for 5 s if it came up before the master listened
            wait_until(lambda: get_json(web), 30, "the master's web UI")
            locust_worker = group.start("worker", outcome.worker_argv, process_env(worker, tmp))

            def finished() -> bool:
                stats = get_json(web)
                served = sum(target.hits().values())
                return bool(
                    stats
                    and stats["state"] == "stopped"
                    and served > 0
                    and aggregated(stats) == served
                )

            # the run time is up and the worker's last report has reached the master
            wait_until(finished, 45, "the run to end with every request in the master's stats")
            # what `kubectl delete` or the operator's autoquit would do: SIGTERM the master,
            # which tells the worker to quit; both flush their telemetry on the way out
            locust_master.signal_group(signal.SIGTERM)
            if scenario.delivers:
                locust_master.wait(30)
                # A worker that never got the master's quit message (seen once on a loaded
                # machine: the worker logged nothing more) quits on its own once the master's
                # heartbeats have stopped for 60 s, as it would in its pod, and flushes its
                # telemetry on the way out all the same.
                locust_worker.wait(LOCUST_MASTER_HEARTBEAT_TIMEOUT + 10)
            else:
                # failing exports retry until OTEL_EXPORTER_OTLP_TIMEOUT (10 s) per signal
                # before the process exits; done waiting once each has given up on them
                endpoint = receiver.grpc_endpoint

                def gave_up(process: Process, signals: tuple[str, ...]) -> bool:
                    return not process.running() or all(
                        f"Failed to export {s} to {endpoint}" in process.log() for s in signals
                    )

                wait_until(
                    lambda: (
                        gave_up(locust_master, ("metrics",))
                        and gave_up(locust_worker, ("traces", "metrics"))
                    ),
                    45,
                    "the exporters to give up",
                )
            # read before any other signal: a second SIGTERM makes Locust write the file again
            written = wait_until(lambda: read_json(json_file), 10, "the master's --json-file")
            outcome.stats = {s["name"]: int(s["num_requests"]) for s in written}
            # nothing left to flush (or it could not be): no need for a polite grace period
            group.stop_all(grace=1.0)
        outcome.hits = target.hits()
    finally:
        target.close()
        outcome.logs = {p.name: p.read_text() for p in sorted(tmp.glob("*.log"))}
    return outcome


def run_exporter(scenario: Scenario, server: Server, tmp: Path) -> Outcome:
    """Master and worker without OTel; scrape the sidecar's LOCUST_EXPORTER_URI while running."""
    target = TargetServer()
    master = admit(server, operator_pod(scenario.test, "master"))
    worker = admit(server, operator_pod(scenario.test, "worker"))
    outcome = Outcome(scenario, OtlpReceiver(), master, worker)
    sidecar = master.env("locust-metrics-exporter")
    outcome.exporter_uri = sidecar["LOCUST_EXPORTER_URI"]
    bind_port, web_port = free_port(), free_port()
    pod_web_port = web_port_of(master.argv())
    # the pod's ports on loopback: 5557 and Locust's own web port get dynamic ones
    argv = substitute(
        master.argv(), {CLUSTER_LOCUSTFILE: str(LOCUSTFILE), CLUSTER_TARGET: target.url}
    )
    argv = drop_option(argv, "--web-port")
    outcome.master_argv = [
        *argv,
        "--master-bind-host=127.0.0.1",
        f"--master-bind-port={bind_port}",
        "--web-host=127.0.0.1",
        f"--web-port={web_port}",
    ]
    outcome.worker_argv = substitute(
        worker.argv(),
        {
            CLUSTER_LOCUSTFILE: str(LOCUSTFILE),
            f"--master-host={scenario.service}": "--master-host=127.0.0.1",
            f"--master-port={MASTER_PORT}": f"--master-port={bind_port}",
        },
    )
    outcome.web_port = pod_web_port
    uri = urlsplit(outcome.exporter_uri)
    port_map = {pod_web_port: web_port}
    assert uri.port in port_map, (
        f"the exporter scrapes port {uri.port}, Locust listens on {pod_web_port}"
    )
    scrape = f"http://127.0.0.1:{port_map[uri.port]}{uri.path.rstrip('/')}/stats/requests"
    try:
        with processes(tmp, PROCESS_CAP) as group:
            group.start("master", outcome.master_argv, process_env(master, tmp))
            wait_until(lambda: get_json(scrape), 30, "the master's web UI")
            group.start("worker", outcome.worker_argv, process_env(worker, tmp))

            def live() -> dict[str, Any] | None:
                stats = get_json(scrape)
                if stats and stats["state"] == "running" and aggregated(stats) > 0:
                    return stats
                return None

            outcome.scraped = wait_until(live, 30, "requests in the stats the exporter scrapes")
        outcome.hits = target.hits()
    finally:
        target.close()
        outcome.logs = {p.name: p.read_text() for p in sorted(tmp.glob("*.log"))}
    return outcome


@dataclass
class World:
    outcomes: dict[str, Future[Outcome]]
    server: Server

    def outcome(self, key: str) -> Outcome:
        return self.outcomes[key].result()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("e2e")
    receivers = {key: OtlpReceiver().start() for key, s in SCENARIOS.items() if s.collector}
    try:
        tests = []
        for key, scenario in SCENARIOS.items():
            test = copy.deepcopy(scenario.test)
            if scenario.collector is not None:
                test["spec"]["observability"] = {
                    "openTelemetry": scenario.collector(receivers[key])
                }
            tests.append(test)
        (tmp / "locusttests").mkdir()
        (tmp / "locusttests" / "tests.yaml").write_text(yaml.safe_dump_all(tests))
        with (
            serve(tmp, "--locusttests", str(tmp / "locusttests"), "--workers", "1") as server,
            ThreadPoolExecutor(max_workers=len(SCENARIOS)) as pool,
        ):
            outcomes: dict[str, Future[Outcome]] = {}
            for key, scenario in SCENARIOS.items():
                directory = tmp / key
                directory.mkdir()
                if scenario.collector is None:
                    outcomes[key] = pool.submit(run_exporter, scenario, server, directory)
                else:
                    outcomes[key] = pool.submit(
                        run_load_test, scenario, server, receivers[key], directory
                    )
            for future in outcomes.values():
                future.exception()  # every run is over before any test looks
            yield World(outcomes, server)
    finally:
        for receiver in receivers.values():
            receiver.stop()


# ---------------------------------------------------------------- what a collector must see


def env_names(admitted: Admitted) -> list[str]:
    container = kubelet.find_container(admitted.pod, admitted.container_name)
    return [e["name"] for e in container.get("env", [])]


def check_injected_locust_container(outcome: Outcome) -> None:
    for admitted, role in ((outcome.master, "master"), (outcome.worker, "worker")):
        args = kubelet.find_container(admitted.pod, admitted.container_name)["args"]
        assert args.count("--otel") == 1
        assert args.index("--otel") < args.index(f"--{role}")
        names = env_names(admitted)
        assert names[-1] == "OTEL_RESOURCE_ATTRIBUTES"
        assert names.index("OTEL_RESOURCE_ATTRIBUTES_POD_NAME") < names.index(
            "OTEL_RESOURCE_ATTRIBUTES"
        )
        # the kubelet resolved the downward API and the $(VAR) reference
        attributes = dict(
            pair.split("=", 1) for pair in admitted.env()["OTEL_RESOURCE_ATTRIBUTES"].split(",")
        )
        assert attributes["k8s.pod.name"] == admitted.name
        assert attributes["locust.role"] == role
        assert not (admitted.pod.get("spec", {}).get("initContainers"))


def check_telemetry(
    outcome: Outcome, transport: str, service_name: str, user: dict[str, str]
) -> None:
    receiver, stats = outcome.receiver, outcome.stats
    assert outcome.total > 0, outcome.explain()
    # Locust counted exactly what the target served (so nothing was lost before Locust)
    assert outcome.hits == Counter({"/": stats["/"], "/item": stats["/item"]}), outcome.explain()

    # everything arrived, and only over the protocol the LocustTest asked for
    assert {e.signal for e in receiver.exports()} == {"traces", "metrics", "logs"}, (
        outcome.explain()
    )
    assert receiver.transports() == {transport}

    def resource_of(admitted: Admitted, role: str) -> dict[str, Any]:
        return {
            "service.name": service_name,
            **user,
            "k8s.namespace.name": NAMESPACE,
            "k8s.pod.name": admitted.name,
            "locust.test.name": outcome.scenario.name,
            "locust.role": role,
        }

    worker_resource = resource_of(outcome.worker, "worker")
    master_resource = resource_of(outcome.master, "master")
    for export in receiver.exports():
        for resource in export.resources:
            expected = worker_resource if resource["locust.role"] == "worker" else master_resource
            assert {k: resource.get(k) for k in expected} == expected, export.signal

    # one span per request, all from the worker, as many as Locust counted, name by name. A
    # user killed in the middle of a request at the end of the run can leave a span that ended
    # in an error for a request Locust never counted (seen once: 50 spans, 49 counted): those
    # are left out of the comparison, at most one per user. OTLP is delivered at least once (an
    # export whose answer came too late is sent again: seen once, 146 spans for 145 requests):
    # a span is counted once by its id.
    sent = [s for s in receiver.spans() if s.scope == "opentelemetry.instrumentation.requests"]
    assert all(s.span_id for s in sent)
    spans = list({s.span_id: s for s in sent}.values())
    completed = Counter(s.name for s in spans if s.status != SPAN_ERROR)
    assert completed == Counter({"GET /": stats["/"], "GET /item": stats["/item"]})
    assert len(spans) - completed.total() <= USERS
    assert {s.resource["locust.role"] for s in spans} == {"worker"}

    # the request-duration histogram's final cumulative count per request name
    durations = receiver.metrics("locust.client.duration")
    assert {r.resource["locust.role"] for r in durations} == {"worker"}
    counts = {p.attributes["name"]: p.count for p in latest_cumulative(durations)}
    assert counts == {"/": stats["/"], "/item": stats["/item"]}

    # the user count comes from the master, and saw all 5 users
    users = receiver.metrics("locust.users.count")
    assert {r.resource["locust.role"] for r in users} == {"master"}
    assert max(p.value or 0 for r in users for p in r.points) == 5


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_grpc_exports_reach_the_collector_with_k8s_resource_attributes(world: World) -> None:
    outcome = world.outcome("grpc")
    assert outcome.master.warnings == [] and outcome.worker.warnings == []
    check_injected_locust_container(outcome)
    env = outcome.worker.env()
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    # Locust overwrites service.name from OTEL_RESOURCE_ATTRIBUTES: the webhook derived it
    assert env["OTEL_SERVICE_NAME"] == "checkout-load"
    check_telemetry(
        outcome,
        "grpc",
        "checkout-load",
        {"deployment.environment": "e2e", "team": "platform"},
    )


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_grpc_without_scheme_works_when_insecure_is_set(world: World) -> None:
    outcome = world.outcome("grpc-insecure")
    assert outcome.master.warnings == [] and outcome.worker.warnings == []
    env = outcome.worker.env()
    assert "://" not in env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert env["OTEL_EXPORTER_OTLP_INSECURE"] == "true"
    check_injected_locust_container(outcome)
    check_telemetry(outcome, "grpc", "insecure-load", {})


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_http_protobuf_exports_reach_the_collector_gzipped(world: World) -> None:
    outcome = world.outcome("http")
    assert outcome.master.warnings == [] and outcome.worker.warnings == []
    check_injected_locust_container(outcome)
    assert outcome.worker.env()["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    check_telemetry(
        outcome,
        "http",
        "shop-http-load",
        {"deployment.environment": "e2e", "team": "platform"},
    )
    assert {e.content_encoding for e in outcome.receiver.exports()} == {"gzip"}


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_grpc_without_scheme_or_insecure_delivers_nothing_and_was_warned(world: World) -> None:
    outcome = world.outcome("grpc-no-scheme")
    endpoint = outcome.receiver.grpc_endpoint
    for admitted in (outcome.master, outcome.worker):
        assert any(endpoint in w and "TLS" in w for w in admitted.warnings), admitted.warnings
        env = admitted.env()
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == endpoint
        assert "OTEL_EXPORTER_OTLP_INSECURE" not in env
    check_injected_locust_container(outcome)
    # the load test itself ran ...
    assert outcome.total > 0
    assert outcome.hits == Counter({"/": outcome.stats["/"], "/item": outcome.stats["/item"]})
    # ... the exporters tried this very collector and gave up (TLS towards plaintext) ...
    worker_log = outcome.logs["worker.log"]
    assert f"Failed to export traces to {endpoint}" in worker_log
    assert f"Failed to export metrics to {endpoint}" in worker_log
    assert "Handshake failed" in worker_log
    # ... and the collector got nothing at all
    assert outcome.receiver.exports() == []


def check_exporter(outcome: Outcome, web_port: int) -> None:
    master, worker = outcome.master, outcome.worker
    sidecars = master.pod["spec"].get("initContainers") or []
    assert [c["name"] for c in sidecars] == ["locust-metrics-exporter"]
    assert sidecars[0]["restartPolicy"] == "Always"
    assert outcome.exporter_uri == f"http://localhost:{web_port}"
    assert master.env("locust-metrics-exporter")["LOCUST_EXPORTER_WEB_LISTEN_ADDRESS"] == ":9646"
    assert outcome.web_port == web_port
    for admitted in (master, worker):
        args = kubelet.find_container(admitted.pod, admitted.container_name)["args"]
        assert "--otel" not in args
        assert not any(name.startswith("OTEL_") for name in admitted.env())
    # worker pods get nothing
    assert worker.pod["spec"]["containers"] == worker.sent["spec"]["containers"]
    assert "initContainers" not in worker.pod["spec"]
    annotations = master.pod["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/port") == "9646"
    # what locust_exporter reads from /stats/requests, live from the running master
    scraped = outcome.scraped
    assert scraped["state"] == "running"
    assert {"stats", "errors", "total_rps", "fail_ratio", "user_count", "workers"} <= set(scraped)
    assert len(scraped["workers"]) == 1
    names = {s["name"] for s in scraped["stats"]}
    assert "Aggregated" in names and names & {"/", "/item"}
    entry = next(s for s in scraped["stats"] if s["name"] == "Aggregated")
    assert {"num_requests", "num_failures", "avg_response_time", "current_rps"} <= set(entry)
    assert sum(outcome.hits.values()) > 0


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_exporter_sidecar_scrapes_the_live_locust_web_endpoint(world: World) -> None:
    outcome = world.outcome("exporter")
    assert outcome.master.warnings == []
    check_exporter(outcome, 8089)


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_exporter_sidecar_follows_the_masters_web_port(world: World) -> None:
    outcome = world.outcome("exporter-web-port")
    check_exporter(outcome, 8090)


# ---------------------------------------------------------------- the kubelet stand-in itself


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)-$(B)", "a-b"),
        ("$(LATER)", "$(LATER)"),  # defined after: stays as written
        ("$(MISSING)x", "$(MISSING)x"),
        ("$$(A)", "$(A)"),
        ("$$$(A)", "$a"),
        ("cost $5 $", "cost $5 $"),
        ("$(A", "$(A"),
        ("$()", "$()"),
    ],
)
def test_kubelet_expands_like_kubernetes(text: str, expected: str) -> None:
    pod = kubelet.create_pod(
        {
            "metadata": {"generateName": "x-", "labels": {"team": "a"}},
            "spec": {
                "containers": [
                    {
                        "name": "c",
                        "env": [
                            {"name": "A", "value": "a"},
                            {"name": "B", "value": "b"},
                            {"name": "V", "value": text},
                            {"name": "LATER", "value": "late"},
                        ],
                    }
                ]
            },
        },
        "ns",
    )
    assert kubelet.container_env(pod, "c")["V"] == expected


def test_kubelet_resolves_field_refs_and_expands_args() -> None:
    def ref(path: str) -> dict[str, Any]:
        return {"valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}

    pod = kubelet.create_pod(
        {
            "metadata": {
                "generateName": "shop-master-",
                "labels": {"team": "a"},
                "annotations": {"note": "n"},
            },
            "spec": {
                "containers": [
                    {
                        "name": "c",
                        "args": ["--tag=$(POD)", "$(NS)", "$$(POD)"],
                        "env": [
                            {"name": "POD", **ref("metadata.name")},
                            {"name": "NS", **ref("metadata.namespace")},
                            {"name": "TEAM", **ref("metadata.labels['team']")},
                            {"name": "NOTE", **ref("metadata.annotations['note']")},
                            {"name": "NODE", **ref("spec.nodeName")},
                            {"name": "IP", **ref("status.podIP")},
                            {"name": "ATTRS", "value": "k8s.pod.name=$(POD),ns=$(NS)"},
                        ],
                    }
                ]
            },
        },
        "perf",
    )
    name = pod["metadata"]["name"]
    assert name.startswith("shop-master-") and len(name) == len("shop-master-") + 5
    env = kubelet.container_env(pod, "c")
    assert env["ATTRS"] == f"k8s.pod.name={name},ns=perf"
    assert (env["TEAM"], env["NOTE"], env["NS"]) == ("a", "n", "perf")
    assert env["NODE"] and env["IP"]
    assert kubelet.container_argv(pod, "c", env, ["locust"]) == [
        "locust",
        f"--tag={name}",
        "perf",
        "$(POD)",
    ]
