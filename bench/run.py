"""The webhook against its framework floor, and how its cost scales (issue 6).

    .venv/bin/python bench/run.py            # ~20 minutes; rewrites bench/RESULTS.md
    .venv/bin/python bench/run.py --quick    # ~2 minutes, fewer rounds and shorter runs

1. Load: the real `locust-webhook serve` (production settings: default workers, threads,
   keep-alive; OTel-enabled and plain LocustTests listed and watched from a local API server
   (tests/kubeapi.py), as in a cluster; certificates from
   `locust-webhook certs`) and the floor (bench/floor.py: the same WebhookServer with a trivial
   handler), both running, loaded in turn by wrk over HTTPS keep-alive with operator-shaped
   AdmissionReviews (bench/admission.lua). Closed loop at 1, 8, 32 connections, and paced at
   250, 500, 1000 requests/s over 8 connections. Rounds alternate which server goes first;
   the tables give medians over rounds, and webhook/floor ratios taken pair by pair.
2. Scale: pod size (in process, and over HTTPS for the ~200 KB pod), number of LocustTests
   (worker memory of a server started with that many, from a directory and from a local API
   server as in a cluster; lookup time in process), concurrency
   (the closed-loop table).
3. Where the time goes: the handler's steps timed in process, and CPU per request of the two
   servers (from /proc) during the closed-loop runs.

Needs `wrk` (Debian package `wrk`). Prints the tables and rewrites bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import datetime
import gc
import itertools
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BIN = Path(sys.executable).parent
LUA = BENCH / "admission.lua"
RESULTS = BENCH / "RESULTS.md"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

# Scratch (the servers' TMPDIR: gunicorn's heartbeat files, the metrics files) in memory when
# the machine has /dev/shm, as the Deployment's /tmp is; removed on the way out. The rest (logs:
# ~300 bytes a request, hundreds of MB a run; bodies, certificates) on disk: a container's
# /dev/shm holds 64 MB.
DISK = tempfile.gettempdir()
SHM = "/dev/shm"
SCRATCH = tempfile.mkdtemp(prefix="bench-", dir=SHM if os.access(SHM, os.W_OK) else None)
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
os.environ["TMPDIR"] = SCRATCH
tempfile.tempdir = None  # read TMPDIR again
# Metrics as under `serve` (multiprocess files): set before webhook.metrics is imported.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="metrics-"))

import orjson  # noqa: E402
import reviews  # noqa: E402
from kubeapi import FakeKubeAPI  # noqa: E402
from server_process import free_port, make_certs  # noqa: E402
from stats import measured_once, median, verdict  # noqa: E402

from webhook.config import ServeSettings  # noqa: E402
from webhook.server import GC_THRESHOLDS  # noqa: E402

WORKERS = ServeSettings().workers  # serve's default: the bench runs serve on its defaults

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# servers


def _stat(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat(int(entry))[1]) == pid:
                    found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return sorted(found)


WATCHER = "webhook.watcher"  # in the watcher process's command line


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat(pid)
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def cpu_counters() -> list[int]:
    """The machine's CPU time counters (the `cpu` line of /proc/stat: user, nice, system, idle,
    iowait, irq, softirq, steal, then guest times already counted in user and nice)."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon from status, Pss from smaps_rollup (kB)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out[key] = int(value.split()[0])
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1])
    return out


def _drain(process: subprocess.Popen[bytes], log_file: Path) -> None:
    assert process.stdout is not None
    with open(log_file, "ab", buffering=0) as log:  # readable as it comes
        while chunk := process.stdout.read1(1 << 16):
            log.write(chunk)


@dataclass
class Server:
    name: str
    command: list[str]
    log_file: Path
    ca_file: Path
    port: int
    env: dict[str, str] | None = None  # added to this process's environment
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ready_after: float = 0.0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.check_hostname = False
        return context

    def start(self, timeout: float = 120.0) -> Server:
        # Output goes through a pipe, drained in large reads, as a container runtime does with
        # a pod's stderr: the admission log lines cost a pipe write each, not a file append.
        self.process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **self.env} if self.env else None,
        )
        threading.Thread(target=_drain, args=(self.process, self.log_file), daemon=True).start()
        self.started = time.monotonic()
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log_file}")
            try:
                with urllib.request.urlopen(
                    f"{self.url}/readyz", context=self.context(), timeout=2
                ) as answer:
                    if answer.status == 200:
                        self.ready_after = time.monotonic() - self.started
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready within {timeout} s; see {self.log_file}")

    def workers(self) -> list[int]:
        return [pid for pid in self.children() if WATCHER not in command_line(pid)]

    def watcher(self) -> int | None:
        """The watcher process of `serve` reading from a cluster (not a worker)."""
        return next((pid for pid in self.children() if WATCHER in command_line(pid)), None)

    def children(self) -> list[int]:
        assert self.process is not None
        return children(self.process.pid)

    def pids(self) -> list[int]:
        assert self.process is not None
        return [self.process.pid, *self.workers()]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def webhook_server(
    tmp: Path, certs: Path, locusttests: Path | None, name: str = "webhook", **env: str
) -> Server:
    """`serve` on its defaults, with LocustTests from a directory, or (None) from the cluster
    that `env` (KUBECONFIG) points to."""
    port = free_port()
    command = [
        str(BIN / "locust-webhook"),
        "serve",
        "--cert-file",
        str(certs / "tls.crt"),
        "--key-file",
        str(certs / "tls.key"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if locusttests is not None:
        command += ["--locusttests", str(locusttests)]
    return Server(name, command, tmp / f"{name}.log", certs / "ca.crt", port, env or None)


def floor_server(tmp: Path, certs: Path) -> Server:
    port = free_port()
    command = [
        sys.executable,
        str(BENCH / "floor.py"),
        "--cert-file",
        str(certs / "tls.crt"),
        "--key-file",
        str(certs / "tls.key"),
        "--port",
        str(port),
    ]
    return Server("floor", command, tmp / "floor.log", certs / "ca.crt", port)


# --------------------------------------------------------------------------------------------
# load


@dataclass(frozen=True)
class Scenario:
    name: str
    connections: int
    threads: int
    rate: int = 0  # 0: closed loop

    @property
    def label(self) -> str:
        if self.rate:
            return f"{self.rate} req/s paced, {self.connections} conns"
        return f"closed loop, {self.connections} conn{'s' if self.connections > 1 else ''}"


SCENARIOS = (
    Scenario("c1", 1, 1),
    Scenario("c8", 8, 2),
    Scenario("c32", 32, 2),
    Scenario("r250", 8, 8, 250),
    Scenario("r500", 8, 8, 500),
    Scenario("r1000", 8, 8, 1000),
)
# The two load mixes. "starts": load tests starting, each a master and 20 identical workers,
# every test new on each pass (what the API server sends; the memo answers the workers after
# the first). "unique": no two pods alike (the memo never answers: the webhook's worst case).
TARGET_SCENARIOS = ("c8", "c32", "r1000")
MIXES = {
    "starts": ("tests starting: a master and 20 identical workers each", SCENARIOS),
    "unique": (
        "every pod unique (memo never hits: worst case)",
        tuple(x for x in SCENARIOS if x.name in ("c1", "c8", "c32", "r1000")),
    ),
}
MIX_BODIES: dict[str, Callable[[], list[tuple[str, bytes]]]] = {
    "starts": reviews.test_starts,
    "unique": lambda: reviews.load_mix(unique_pods=True),
}


WRK_RUNS = itertools.count(1)  # tells each run's uids and test starts from the run before


def run_wrk(server: Server, bodies: Path, scenario: Scenario, seconds: float) -> dict[str, Any]:
    """One wrk run; the script's numbers plus the server's CPU per request."""
    env = {
        **os.environ,
        "BENCH_BODIES": str(bodies),
        "BENCH_RATE": str(scenario.rate),
        "BENCH_RUN": str(next(WRK_RUNS)),
        "BENCH_THREADS": str(scenario.threads),
    }
    command = [
        "wrk",
        "-t",
        str(scenario.threads),
        "-c",
        str(scenario.connections),
        "-d",
        f"{seconds:g}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA),
        f"{server.url}/mutate",
    ]
    pids = server.pids()
    cpu_before = cpu_seconds(pids)
    gen_before = os.times()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    gen_after = os.times()
    cpu_after = cpu_seconds(pids)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["connections"] = scenario.connections
    result["errors"] = sum(
        int(result[k])
        for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout")
    ) + int(result.get("bad_answers", 0))
    requests = max(int(result["requests"]), 1)
    result["cpu_us_per_req"] = (cpu_after - cpu_before) / requests * 1e6
    gen_cpu = (gen_after.children_user + gen_after.children_system) - (
        gen_before.children_user + gen_before.children_system
    )
    result["wrk_cpu_us_per_req"] = gen_cpu / requests * 1e6
    return result


def admission_outcomes(server: Server) -> dict[str, int]:
    """The webhook's own count of its answers, by outcome (its /metrics, all workers)."""
    import http.client

    from prometheus_client.parser import text_string_to_metric_families

    connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=server.context())
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    counts: collections.Counter[str] = collections.Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "locust_webhook_admissions":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["outcome"]] += int(sample.value)
    return dict(counts)


def sanity(server: Server, mix: list[tuple[str, bytes]], mutating: bool) -> None:
    """Each body once: 200, the uid sent back, allowed; a patch where the webhook mutates
    (every pod but the workers of tests without observability)."""
    import http.client

    connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=server.context())
    for index, (kind, raw) in enumerate(mix):
        uid = f"sanity-{index:04d}"
        payload = raw.replace(reviews.PLACEHOLDER.encode(), uid.encode()).replace(
            reviews.START_PLACEHOLDER.encode(), b"sanity"
        )
        connection.request("POST", "/mutate", payload, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise AssertionError(f"{server.name}: {kind}: HTTP {answer.status}: {data[:300]!r}")
        response = orjson.loads(data)["response"]
        if response["uid"] != uid or response["allowed"] is not True:
            raise AssertionError(f"{server.name}: {kind}: bad answer {response}")
        if mutating and kind != "plain-worker" and response.get("patchType") != "JSONPatch":
            raise AssertionError(f"{server.name}: {kind}: no patch in {response}")
    connection.close()


# --------------------------------------------------------------------------------------------
# in process


def quiet_logging() -> None:
    """The server's JSON log formatting, written to /dev/null: its cost counts, not its noise.
    The admission line is written straight to fd 2, so fd 2 goes to /dev/null too; this
    script's own stderr moves to a copy of the original descriptor."""
    from webhook.logs import JsonFormatter

    sys.stderr.flush()
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO)


class DictSource:
    """A LocustTestSource over a dict, for in-process timing."""

    def __init__(self, tests: list[dict[str, Any]]) -> None:
        from webhook.models import parse_locusttest

        infos = [parse_locusttest(t) for t in tests]
        self._tests = {(i.namespace, i.name): i for i in infos}

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def ready(self) -> bool:
        return True

    def size(self) -> int:
        return len(self._tests)

    def get(self, namespace: str, name: str) -> Any:
        return self._tests.get((namespace, name))


def with_uid(raw: bytes, uid: str) -> bytes:
    return raw.replace(reviews.PLACEHOLDER.encode(), uid.encode())


_serial = itertools.count()


def fresh(raw: bytes) -> bytes:
    """The body with a uid never used before (and, for a unique pod, a pod never seen)."""
    return with_uid(raw, f"u{next(_serial)}")


def time_calls(call: Callable[[int], Any], iterations: int, warmup: int = 50) -> list[float]:
    """Microseconds per call, one sample per call."""
    for i in range(warmup):
        call(i)
    samples = []
    clock = time.perf_counter_ns
    gc.collect()
    for i in range(iterations):
        started = clock()
        call(i)
        samples.append((clock() - started) / 1000)
    return samples


def batched_ns(
    get: Callable[..., Any], keys: list[tuple[str, str]], batch: int = 1000
) -> list[float]:
    """Nanoseconds per call, one sample per batch of `batch` calls (no timer overhead)."""
    clock = time.perf_counter_ns
    samples = []
    for start in range(0, len(keys) - batch + 1, batch):
        chunk = keys[start : start + batch]
        began = clock()
        for namespace, name in chunk:
            get(namespace, name)
        samples.append((clock() - began) / batch)
    return samples


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(len(ordered) * p / 100) - 1))]


def handler_for(tests: list[dict[str, Any]]) -> Any:
    from webhook.config import MutationSettings
    from webhook.handler import Handler

    return Handler(DictSource(tests), MutationSettings())


SERVE_GC = f"gc as under serve (freeze, gen0 threshold {GC_THRESHOLDS[0]:,})"


@contextlib.contextmanager
def serve_gc() -> Iterator[None]:
    """The garbage collector as `serve`'s workers run it (server.tune_gc), then as it was."""
    from webhook.server import tune_gc

    threshold = gc.get_threshold()
    tune_gc()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def pod_size_curve(iterations: int) -> list[dict[str, Any]]:
    handler = handler_for(reviews.load_locusttests())
    rows = []
    for containers in (1, 10, 50):
        for managed in (False, True):
            raw = reviews.body(reviews.unique(reviews.scale_pod(containers, managed)))
            answer = orjson.loads(handler.handle(with_uid(raw, "check")))["response"]
            assert answer.get("patchType") == "JSONPatch", answer
            n = iterations if len(raw) < 50_000 else max(iterations // 5, 200)
            with serve_gc():
                handle = time_calls(lambda i, raw=raw: handler.handle(fresh(raw)), n)
            parse = time_calls(lambda i, raw=raw: orjson.loads(raw), n)
            rows.append(
                {
                    "containers": containers,
                    "managed": managed,
                    "bytes": len(raw),
                    "p50": pct(handle, 50),
                    "p99": pct(handle, 99),
                    "parse_p50": pct(parse, 50),
                    "n": n,
                }
            )
    return rows


def breakdown(iterations: int) -> list[dict[str, Any]]:
    """The handler's steps, each timed alone, on the load mix and on the ~200 KB pod; every pod
    unique (the memo misses) except in the memo-hit row."""
    from webhook import logs, metrics
    from webhook.mutation import mutate
    from webhook.patch import diff
    from webhook.review import encode_patch, envelope, parse_review, patched

    tests = reviews.load_locusttests()
    handler = handler_for(tests)
    sets = {
        "load mix (~3.5 KB)": [b for _, b in reviews.load_mix(unique_pods=True)],
        "50 containers + managedFields (~200 KB)": [
            reviews.body(reviews.unique(reviews.scale_pod(50, True)))
        ],
    }
    rows: list[dict[str, Any]] = []

    def one_set(label: str, bodies: list[bytes]) -> None:
        n = iterations if len(bodies) > 1 else max(iterations // 5, 200)
        raw = bodies
        bodies = [with_uid(b, "00000000-0000-4000-8000-000000000000") for b in bodies]
        reviews_ = [parse_review(b) for b in bodies]
        tests_ = [
            handler.source.get(r.namespace, r.object["metadata"]["labels"]["performance-test-name"])
            for r in reviews_
        ]
        results = [
            mutate(r.object, t, r.namespace, handler.settings)
            for r, t in zip(reviews_, tests_, strict=True)
        ]
        patches = [diff(r.object, m.pod) for r, m in zip(reviews_, results, strict=True)]
        k = len(bodies)

        def step(name: str, call: Callable[[int], Any]) -> None:
            samples = time_calls(call, n)
            rows.append(
                {
                    "set": label,
                    "step": name,
                    "p50": pct(samples, 50),
                    "mean": statistics.fmean(samples),
                }
            )

        step("orjson.loads(body)", lambda i: orjson.loads(bodies[i % k]))
        step("parse_review", lambda i: parse_review(bodies[i % k]))

        def decide_missing(i: int) -> Any:
            handler._memo.clear()
            return handler._decide(reviews_[i % k])

        step("_decide, memo miss: lookup + mutate + diff + answer", decide_missing)
        step(
            "_decide, memo hit: lookup + fingerprint + answer",
            lambda i: handler._decide(reviews_[i % k]),
        )
        step(
            "  mutate()",
            lambda i: mutate(
                reviews_[i % k].object, tests_[i % k], reviews_[i % k].namespace, handler.settings
            ),
        )
        step("  diff()", lambda i: diff(reviews_[i % k].object, results[i % k].pod))
        step(
            "  patched() (orjson + base64)",
            lambda i: patched("uid", encode_patch(patches[i % k]), results[i % k].warnings),
        )
        step("envelope()", lambda i: envelope("admission.k8s.io/v1", {"uid": "u", "allowed": True}))
        step(
            "metrics (counter + histogram)",
            lambda i: (
                metrics.ADMISSIONS.labels("patched", "otel").inc(),
                metrics.LATENCY.observe(0.0002),
            ),
        )
        step(
            "admission log line (JSON, /dev/null)",
            lambda i: logs.admission(
                {
                    "uid": "u",
                    "namespace": "ns",
                    "pod": "p-",
                    "locusttest": "t",
                    "role": "master",
                    "outcome": "patched",
                    "reason": "otel",
                    "dry_run": False,
                    "ms": 0.123,
                }
            ),
        )
        step(
            "Handler.handle (all of it; a unique pod each)",
            lambda i: handler.handle(fresh(raw[i % k])),
        )
        step(
            "Handler.handle, memo hit (the same pod again)", lambda i: handler.handle(bodies[i % k])
        )
        p99 = pct(time_calls(lambda i: handler.handle(fresh(raw[i % k])), n), 99)
        rows.append(
            {
                "set": label,
                "step": "Handler.handle p99 (gc default)",
                "p50": p99,
                "mean": float("nan"),
            }
        )
        with serve_gc():
            samples = time_calls(lambda i: handler.handle(fresh(raw[i % k])), n)
        rows.append(
            {
                "set": label,
                "step": f"Handler.handle p50, {SERVE_GC}",
                "p50": pct(samples, 50),
                "mean": statistics.fmean(samples),
            }
        )
        rows.append(
            {
                "set": label,
                "step": f"Handler.handle p99, {SERVE_GC}",
                "p50": pct(samples, 99),
                "mean": float("nan"),
            }
        )

    for label, bodies in sets.items():
        one_set(label, bodies)
    return rows


def profile_top(iterations: int, limit: int = 18) -> str:
    """cProfile of Handler.handle over the load mix: the top functions by own time."""
    import cProfile
    import io
    import pstats

    handler = handler_for(reviews.load_locusttests())
    mix = [b for _, b in reviews.load_mix(unique_pods=True)]
    bodies = [fresh(mix[i % len(mix)]) for i in range(iterations)]
    profiler = cProfile.Profile()
    profiler.enable()
    for body in bodies:
        handler.handle(body)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    text = out.getvalue()
    start = text.find("   ncalls")
    return text[start:].rstrip() if start >= 0 else text


PROFILE_RULES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    (
        "handler: admission log line",
        lambda s: "Handler.handle" in s and ("logging/" in s or "webhook/logs.py" in s),
    ),
    ("handler: metrics", lambda s: "Handler.handle" in s and "prometheus_client" in s),
    ("handler: parse_review (orjson.loads)", lambda s: "parse_review" in s),
    ("handler: mutate()", lambda s: "mutation/" in s),
    ("handler: diff()", lambda s: "webhook/patch.py" in s),
    ("handler: rest (envelope, base64, outcome)", lambda s: "Handler.handle" in s),
    ("view: read body", lambda s: "_read_body" in s or "get_data" in s),
    ("view: rest (floor: its orjson.loads; mimetype, Response)", lambda s: ".<locals>.mutate" in s),
    ("Flask/werkzeug request and response", lambda s: "Flask.__call__" in s),
    ("gunicorn: access log atoms (then dropped)", lambda s: "glogging.py" in s),
    ("gunicorn: write response (TLS)", lambda s: "sendall" in s or "ssl.py:12" in s),
    ("gunicorn: parse request", lambda s: "gunicorn/http/" in s),
    ("gunicorn: rest (poller, keep-alive, TLS read)", lambda s: "gunicorn" in s),
    ("other", lambda s: True),
)


def pyspy_profile(server: Server, bodies: Path, seconds: int = 10) -> dict[str, float] | None:
    """Share of GIL-holding samples per category in the workers under closed-loop load (8
    connections); None when py-spy is not installed (pip install py-spy)."""
    pyspy = BIN / "py-spy"
    if not pyspy.exists():
        return None
    outputs = []
    spies = []
    for pid in server.workers():
        out = bodies.parent / f"pyspy-{server.name}-{pid}.txt"
        outputs.append(out)
        spies.append(
            subprocess.Popen(
                [
                    str(pyspy),
                    "record",
                    "-p",
                    str(pid),
                    "-d",
                    str(seconds),
                    "-r",
                    "200",
                    "--gil",
                    "--nonblocking",
                    "-f",
                    "raw",
                    "-o",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    time.sleep(0.5)
    run_wrk(server, bodies, Scenario("c8", 8, 2), seconds - 1)
    for spy in spies:
        spy.wait(timeout=60)
    totals: dict[str, float] = dict.fromkeys((name for name, _ in PROFILE_RULES), 0.0)
    for out in outputs:
        if not out.exists():
            continue
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            for name, rule in PROFILE_RULES:
                if rule(stack):
                    totals[name] += int(count)
                    break
    total = sum(totals.values()) or 1.0
    return {name: value / total for name, value in totals.items()}


def served_memory(
    server: Server, bodies: Path, load_seconds: float, settle_s: float
) -> tuple[list[dict[str, int]], dict[str, int], dict[str, int]]:
    """Memory of the workers, of the master and of the watcher process (empty without one) of
    `server` once ready, settled and loaded."""
    try:
        server.start(timeout=300)
        if server.watcher() is not None:
            # Every worker has its copy of the watcher's LocustTests (each logs it once).
            deadline = time.monotonic() + 120
            while server.log_file.read_text().count("LocustTests from the watcher") < WORKERS:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workers got no LocustTests; see {server.log_file}")
                time.sleep(0.1)
        time.sleep(settle_s)
        run_wrk(server, bodies, Scenario("c8", 8, 2), load_seconds)
        watcher = server.watcher()
        return (
            [memory_kb(pid) for pid in server.workers()],
            memory_kb(server.pids()[0]),
            {} if watcher is None else memory_kb(watcher),
        )
    finally:
        server.stop()


def lookup_times(
    tmp: Path, tests_by_count: dict[int, list[dict[str, Any]]], rounds: int
) -> dict[int, dict[str, float]]:
    """In process, per count: `DirectorySource` load time, `get` on hits and misses (20,000
    random keys, timed in batches of 1,000) and `Handler.handle` with a source holding those
    LocustTests, on master and worker pods (unique, with managedFields) of 1,000 of them drawn
    at random. The counts alternate over `rounds` and each figure is the median of the rounds:
    a noisy moment of the shared machine does not land on one count alone."""
    from webhook.lookup import DirectorySource

    prepared = {}
    for count, tests in tests_by_count.items():
        directory = tmp / f"locusttests-{count}"
        started = time.perf_counter()
        source = DirectorySource(directory)
        load_s = time.perf_counter() - started
        keys = [(t["metadata"]["namespace"], t["metadata"]["name"]) for t in tests] or [
            ("team-0", "scale-0")
        ]
        rng = random.Random(count)
        probe = [rng.choice(keys) for _ in range(20000)]
        missing = [(ns, name + "-missing") for ns, name in probe]
        mix = [
            reviews.body(
                reviews.unique(
                    reviews.with_managed_fields(
                        reviews.operator_pod(name, ("master", "worker")[i % 2])
                    )
                ),
                namespace=ns,
            )
            for i, (ns, name) in enumerate(probe[:1000])
        ]
        prepared[count] = (source, probe, missing, handler_for(tests), mix, load_s)
    samples: dict[int, dict[str, list[float]]] = {
        c: collections.defaultdict(list) for c in prepared
    }
    for _ in range(rounds):
        for count, (source, probe, missing, handler, mix, _) in prepared.items():
            hit = batched_ns(source.get, probe)
            handle = time_calls(lambda i, h=handler, m=mix: h.handle(fresh(m[i % len(m)])), 3000)
            for key, value in (
                ("get_hit_ns", pct(hit, 50)),
                ("get_hit_max_ns", max(hit)),
                ("get_miss_ns", pct(batched_ns(source.get, missing), 50)),
                ("handle_p50", pct(handle, 50)),
                ("handle_p99", pct(handle, 99)),
            ):
                samples[count][key].append(value)
    return {
        count: {"load_s": prepared[count][5]} | {k: median(v) for k, v in samples[count].items()}
        for count in prepared
    }


def cache_curve(
    tmp: Path, certs: Path, counts: tuple[int, ...], load_seconds: float, rounds: int
) -> list[dict[str, Any]]:
    """Per count: worker memory of `serve` with that many LocustTests, from a directory and from
    a local API server (tests/kubeapi.py: list+watch over HTTPS), and in-process load and
    lookup time of the directory source (lookup_times)."""
    from webhook.models import parse_locusttest

    mix = []
    for i in range(10):
        for role in ("master", "worker"):
            pod = reviews.unique(
                reviews.with_managed_fields(reviews.operator_pod(f"scale-{i}", role))
            )
            mix.append(reviews.body(pod, namespace=f"team-{i % 20}"))
    bodies = tmp / "cache-bodies.txt"
    reviews.write_bodies(bodies, mix)
    tests_by_count = {count: reviews.filler_locusttests(count) for count in counts}
    for count, tests in tests_by_count.items():
        reviews.write_locusttests(tmp / f"locusttests-{count}", tests)
    times = lookup_times(tmp, tests_by_count, rounds)
    rows = []
    for count, tests in tests_by_count.items():
        directory = tmp / f"locusttests-{count}"
        # Memory of the parsed objects alone (what any source keeps per LocustTest).
        gc.collect()
        tracemalloc.start()
        kept = {(t.namespace, t.name): t for t in (parse_locusttest(x) for x in tests)}
        heap = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del kept
        server = webhook_server(tmp, certs, directory, name=f"webhook-{count}")
        # Both workers load the directory at boot; give the slower one time, then load both.
        settle = max(1.0, times[count]["load_s"] * 1.5)
        worker_mem, master_mem, _ = served_memory(server, bodies, load_seconds, settle)
        # The production source: the same LocustTests listed and watched from an API server.
        with FakeKubeAPI() as api:
            for test in tests:
                api.create(test)
            cluster = webhook_server(
                tmp, certs, None, name=f"webhook-cluster-{count}",
                KUBECONFIG=str(api.write_kubeconfig(tmp / f"kubeconfig-{count}")),
                KUBERNETES_SERVICE_HOST="",
            )  # fmt: skip
            cluster_mem, cluster_master, watcher = served_memory(cluster, bodies, load_seconds, 1.0)
        rows.append(
            {
                "count": count,
                "files": len(list(directory.glob("*.yaml"))),
                "ready_s": server.ready_after,
                "rss_mb": [m["VmRSS"] / 1024 for m in worker_mem],
                "anon_mb": [m["RssAnon"] / 1024 for m in worker_mem],
                "pss_mb": [m.get("Pss", 0) / 1024 for m in worker_mem],
                "master_rss_mb": master_mem["VmRSS"] / 1024,
                "cluster_rss_mb": [m["VmRSS"] / 1024 for m in cluster_mem],
                "cluster_pss_mb": [m.get("Pss", 0) / 1024 for m in cluster_mem],
                "cluster_master_pss_mb": cluster_master.get("Pss", 0) / 1024,
                "watcher_rss_mb": watcher["VmRSS"] / 1024,
                "watcher_pss_mb": watcher.get("Pss", 0) / 1024,
                "cluster_ready_s": cluster.ready_after,
                "heap_kb": heap / 1024,
                **times[count],
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# report


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.add("| " + " | ".join(header) + " |")
        self.add("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            self.add("| " + " | ".join(row) + " |")
        self.add()


def ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def machine() -> dict[str, str]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else "?",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="webhook vs floor benchmark and scale curves")
    parser.add_argument("--quick", action="store_true", help="one round, short runs (~2 min)")
    parser.add_argument("--rounds", type=int, default=None, help="load rounds (default 3, quick 1)")
    parser.add_argument("--skip-scale", action="store_true", help="only the load comparison")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile: py-spy (if installed in the venv) on both servers under load, "
        "and cProfile of Handler.handle in process",
    )
    parser.add_argument("--no-write", action="store_true", help="do not rewrite bench/RESULTS.md")
    args = parser.parse_args()
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    closed_s, paced_s = (3, 4) if quick else (6, 8)
    extra_rounds = 0 if quick else 8  # for the scenarios the targets are judged on
    iterations = 1000 if quick else 4000
    counts = (0, 10, 1000, 10000)

    if subprocess.run(["which", "wrk"], capture_output=True, check=False).returncode != 0:
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    quiet_logging()
    info = machine()
    began = time.monotonic()
    counters = cpu_counters()
    report = Report()
    flags = " ".join(sys.argv[1:])
    command = f".venv/bin/python bench/run.py{' ' + flags if flags else ''}"
    report.add("# Benchmark results")
    report.add()
    report.add(
        f"`{command}` (`make bench` runs it), "
        f"{info['date']}; {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"Linux {info['kernel']}, {info['wrk']}. The load generator shares the CPUs with the "
        f"servers. Load average at start: {info['load']}. Scratch directory (the servers' "
        f"TMPDIR): {SCRATCH}. Latencies in ms."
    )
    report.add()

    # An API server sends a watch a bookmark about once a minute (the local one: 5 a second).
    with (
        tempfile.TemporaryDirectory(prefix="bench-", dir=DISK) as tmp_name,
        FakeKubeAPI(bookmark_interval=60.0) as api,
    ):
        tmp = Path(tmp_name)
        certs = make_certs(tmp / "certs")
        for test in reviews.load_locusttests():
            api.create(test)
        mixes = {name: MIX_BODIES[name]() for name in MIXES}
        mix_files = {name: tmp / f"mix-{name}.txt" for name in MIXES}
        for name, mix in mixes.items():
            reviews.write_bodies(mix_files[name], [b for _, b in mix])
        big = reviews.body(reviews.unique(reviews.scale_pod(50, True)))
        big_file = tmp / "big.txt"
        reviews.write_bodies(big_file, [big])

        # As deployed: the LocustTests from the cluster (listed and watched by the watcher
        # process, each worker answering from its copy).
        webhook = webhook_server(
            tmp, certs, None,
            KUBECONFIG=str(api.write_kubeconfig(tmp / "kubeconfig")), KUBERNETES_SERVICE_HOST="",
        )  # fmt: skip
        floor = floor_server(tmp, certs)
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        ratios: dict[str, dict[str, list[float]]] = {}
        big_results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        profiles: dict[str, dict[str, float] | None] = {}
        try:
            webhook.start()
            floor.start()
            for mix in mixes.values():
                sanity(webhook, mix, mutating=True)
                sanity(floor, mix, mutating=False)
            for server in (webhook, floor):  # warm up: imports, first connections
                run_wrk(server, mix_files["unique"], Scenario("c8", 8, 2), 2)
            before = admission_outcomes(webhook)
            runs = [
                (name, scenario) for name, (_, scenarios) in MIXES.items() for scenario in scenarios
            ]
            print(
                f"servers up; load: {rounds} round(s) of {len(runs)} runs x 2 servers", flush=True
            )

            def run_pair(round_: int, index: int, mix_name: str, scenario: Scenario) -> None:
                key = f"{mix_name}:{scenario.name}"
                order = (webhook, floor) if (round_ + index) % 2 == 0 else (floor, webhook)
                pair = {}
                for server in order:
                    seconds = paced_s if scenario.rate else closed_s
                    result = run_wrk(server, mix_files[mix_name], scenario, seconds)
                    pair[server.name] = result
                    results.setdefault((server.name, key), []).append(result)
                    print(
                        f"  round {round_ + 1} {key:14} {server.name:8} "
                        f"{result['rps']:8.0f} req/s  p50 {ms(result['p50_us'])}  "
                        f"p99 {ms(result['p99_us'])}  errors {result['errors']}",
                        flush=True,
                    )
                w, f = pair["webhook"], pair["floor"]
                entry = ratios.setdefault(key, {})
                entry.setdefault("rps", []).append(w["rps"] / f["rps"])
                entry.setdefault("p50", []).append(w["p50_us"] / f["p50_us"])
                entry.setdefault("p99", []).append(w["p99_us"] / f["p99_us"])
                if scenario.rate:
                    entry.setdefault("co_p99", []).append(w["co_p99_us"] / f["co_p99_us"])

            for round_ in range(rounds):
                for index, (mix_name, scenario) in enumerate(runs):
                    run_pair(round_, index, mix_name, scenario)
            # The numbers the targets are judged on move most from run to run (a few hiccups of
            # the shared machine decide a p99): more pairs for them, the same median rule.
            target_runs = [(name, sc) for name, sc in runs if sc.name in TARGET_SCENARIOS]
            for round_ in range(rounds, rounds + extra_rounds):
                for index, (mix_name, scenario) in enumerate(target_runs):
                    run_pair(round_, index, mix_name, scenario)
            big_scenarios = (Scenario("c1", 1, 1), Scenario("c8", 8, 2))
            for round_ in range(1 if quick else 2):
                for scenario in big_scenarios:
                    for server in (webhook, floor) if round_ % 2 == 0 else (floor, webhook):
                        result = run_wrk(server, big_file, scenario, closed_s)
                        big_results.setdefault((server.name, scenario.name), []).append(result)
            after = admission_outcomes(webhook)
            if args.profile:
                print("profiling the workers with py-spy", flush=True)
                profiles = {
                    server.name: pyspy_profile(server, mix_files["unique"])
                    for server in (webhook, floor)
                }
        finally:
            webhook.stop()
            floor.stop()
        # wrk checks only the status (and, paced, "allowed"): the webhook's own count of its
        # answers over the load says whether they were the patches wanted, not a fail-open
        # (also an HTTP 200). It answers the requests in flight when a run ends, which wrk
        # does not count: at most one per connection.
        outcomes = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        answered = sum(outcomes.values())
        webhook_runs = [
            r
            for source in (results, big_results)
            for (name, _), runs in source.items()
            if name == "webhook"
            for r in runs
        ]
        sent = sum(int(r["requests"]) for r in webhook_runs)
        in_flight = sum(int(r["connections"]) for r in webhook_runs)
        wanted = {"patched", "unchanged"}  # unchanged: the workers of tests without OTel
        if {k for k, v in outcomes.items() if v} - wanted or not (
            sent <= answered <= sent + in_flight
        ):
            kept = Path(DISK) / "bench-webhook.log"
            shutil.copyfile(webhook.log_file, kept)
            raise AssertionError(
                f"the webhook answered {outcomes} for {sent:,} requests that wrk counted "
                f"(and at most {in_flight} in flight): every one should be patched or "
                f"unchanged; its log: {kept}"
            )

        def med(server: str, scenario: str, key: str, source: dict = results) -> float:
            return median([float(r[key]) for r in source[(server, scenario)]])

        report.add("## Webhook vs floor")
        report.add()
        report.add(
            "Load mixes of operator-shaped pods of 10 OTel-enabled LocustTests and 10 without "
            "observability (exporter sidecar on their masters), with managedFields, ~3.5 KB "
            f"each. starts ({len(mixes['starts'])} bodies): each test's master, then its 20 "
            "workers (identical, as a Job's pods are), all tests new on each pass: what the API "
            "server sends when tests start; half of its pods (the workers of the tests without "
            "observability) need no patch, and the memo answers all but the first pod of each "
            "shape (~90% of requests). unique: the OTel master and worker and exporter "
            f"master pods ({len(mixes['unique'])} bodies) with a pod annotation unique per "
            "request, so no two pods are alike and the memo never answers"
            + f". Medians of {rounds} round(s) ({rounds + extra_rounds} for 8 and 32 "
            "connections and 1,000 req/s paced, the scenarios of the targets, whose numbers "
            f"move most from run to run); runs of {closed_s} s "
            f"(closed loop) and {paced_s} s (paced); the two servers alternate. Ratios are "
            "webhook/floor taken pair "
            "by pair in the same round, then the median. Paced: wrk's latency is from the actual "
            'send; "from schedule" is from the intended send time (coordinated omission '
            "corrected, 1 ms timer granularity). CPU/req: server processes' CPU (all workers) "
            "per request. The webhook runs as deployed, its LocustTests listed and watched from "
            "a local API server (tests/kubeapi.py) by its watcher process. Its own count of "
            "its answers over the load (/metrics): "
            + ", ".join(f"{name} {count:,}" for name, count in sorted(outcomes.items()) if count)
            + f", nothing failed open, denied or skipped, for {sent:,} requests wrk counted "
            "(and those in flight when a run ended)."
        )
        report.add()
        for mix_name, (mix_label, scenarios) in MIXES.items():
            report.add(f"### Load mix: {mix_label}")
            report.add()
            rows = []
            for scenario in scenarios:
                key = f"{mix_name}:{scenario.name}"
                for name in ("webhook", "floor"):
                    rows.append(
                        [
                            scenario.label if name == "webhook" else "",
                            name,
                            f"{med(name, key, 'rps'):.0f}",
                            ms(med(name, key, "p50_us")),
                            ms(med(name, key, "p90_us")),
                            ms(med(name, key, "p99_us")),
                            ms(med(name, key, "co_p99_us")) if scenario.rate else "",
                            f"{med(name, key, 'cpu_us_per_req'):.0f}",
                            str(sum(int(r["errors"]) for r in results[(name, key)])),
                        ]
                    )
            report.table(
                [
                    "scenario",
                    "server",
                    "req/s",
                    "p50",
                    "p90",
                    "p99",
                    "p99 from schedule",
                    "server CPU µs/req",
                    "errors",
                ],
                rows,
            )
            report.add("Ratios webhook/floor (median of per-round pairs):")
            report.add()
            rrows = []
            for scenario in scenarios:
                r = ratios[f"{mix_name}:{scenario.name}"]
                per_round = r["p99"] if scenario.rate else r["rps"]
                rrows.append(
                    [
                        scenario.label,
                        f"{median(r['rps']):.2f}",
                        f"{median(r['p50']):.2f}",
                        f"{median(r['p99']):.2f}",
                        f"{median(r['co_p99']):.2f}" if scenario.rate else "",
                        " ".join(f"{x:.2f}" for x in per_round),
                    ]
                )
            report.table(
                [
                    "scenario",
                    "req/s",
                    "p50",
                    "p99",
                    "p99 from schedule",
                    "per round (req/s closed, p99 paced)",
                ],
                rrows,
            )

        report.add("## Scale: a ~200 KB pod over HTTPS (50 containers with managedFields)")
        report.add()
        brows = []
        for scenario in big_scenarios:
            for name in ("webhook", "floor"):
                brows.append(
                    [
                        scenario.label if name == "webhook" else "",
                        name,
                        f"{med(name, scenario.name, 'rps', big_results):.0f}",
                        ms(med(name, scenario.name, "p50_us", big_results)),
                        ms(med(name, scenario.name, "p99_us", big_results)),
                        f"{med(name, scenario.name, 'cpu_us_per_req', big_results):.0f}",
                        str(sum(int(r["errors"]) for r in big_results[(name, scenario.name)])),
                    ]
                )
        report.table(
            ["scenario", "server", "req/s", "p50", "p99", "server CPU µs/req", "errors"], brows
        )

        size_rows = cache_rows = None
        if not args.skip_scale:
            print("scale: pod size (in process)", flush=True)
            size_rows = pod_size_curve(iterations)
            report.add(
                "## Scale: pod size, in process (`Handler.handle(body)`, OTel master pod, a "
                "unique pod each, gc as under serve)"
            )
            report.add()
            report.table(
                [
                    "containers",
                    "managedFields",
                    "body KB",
                    "handle p50 µs",
                    "handle p99 µs",
                    "of which orjson.loads p50 µs",
                    "iterations",
                ],
                [
                    [
                        str(r["containers"]),
                        "yes" if r["managed"] else "no",
                        f"{r['bytes'] / 1024:.0f}",
                        f"{r['p50']:.0f}",
                        f"{r['p99']:.0f}",
                        f"{r['parse_p50']:.0f}",
                        str(r["n"]),
                    ]
                    for r in size_rows
                ],
            )
            print("scale: LocustTests cached (a server per count)", flush=True)
            cache_rows = cache_curve(tmp, certs, counts, 2 if quick else 3, 2 if quick else 5)
            report.add(f"## Scale: LocustTests cached (`serve`, {WORKERS} workers)")
            report.add()
            report.add(
                "Worker memory after boot and a few seconds of load (VmRSS / RssAnon / Pss per "
                "worker, MB) of `serve --locusttests DIR`, and VmRSS / Pss of `serve` reading the "
                "same LocustTests from a local API server (tests/kubeapi.py, list+watch over "
                "HTTPS), as in a cluster: its watcher process holds the Kubernetes client and "
                "the list+watch, each worker a copy of the parsed LocustTests. Pss counts a page "
                "shared with the master once across the processes sharing it, RSS in full in "
                "each. In process: parsed objects' heap (tracemalloc), `DirectorySource` "
                "load time, `get` time (20,000 random keys, timed in batches of 1,000), and "
                "`Handler.handle` with a source holding all of them on master and worker pods "
                "of 1,000 of them drawn at random (a unique pod each): medians of rounds "
                "alternating the counts. YAML files of "
                "100 LocustTests each."
            )
            report.add()
            report.table(
                [
                    "LocustTests",
                    "worker VmRSS MB",
                    "worker RssAnon MB",
                    "worker Pss MB",
                    "master RSS MB",
                    "cluster source: worker VmRSS MB",
                    "cluster source: worker Pss MB",
                    "cluster source: master Pss MB",
                    "cluster source: watcher VmRSS / Pss MB",
                    "cluster source: ready s",
                    "parsed heap KB",
                    "dir load s",
                    "ready s",
                    "get hit ns (p50 / worst batch)",
                    "get miss ns",
                    "handle p50 / p99 µs",
                ],
                [
                    [
                        f"{r['count']:,}" if r["count"] else "0 (empty dir)",
                        " / ".join(f"{x:.1f}" for x in r["rss_mb"]),
                        " / ".join(f"{x:.1f}" for x in r["anon_mb"]),
                        " / ".join(f"{x:.1f}" for x in r["pss_mb"]),
                        f"{r['master_rss_mb']:.1f}",
                        " / ".join(f"{x:.1f}" for x in r["cluster_rss_mb"]),
                        " / ".join(f"{x:.1f}" for x in r["cluster_pss_mb"]),
                        f"{r['cluster_master_pss_mb']:.1f}",
                        f"{r['watcher_rss_mb']:.1f} / {r['watcher_pss_mb']:.1f}",
                        f"{r['cluster_ready_s']:.1f}",
                        f"{r['heap_kb']:.0f}",
                        f"{r['load_s']:.2f}",
                        f"{r['ready_s']:.1f}",
                        f"{r['get_hit_ns']:.0f} / {r['get_hit_max_ns']:.0f}",
                        f"{r['get_miss_ns']:.0f}",
                        f"{r['handle_p50']:.0f} / {r['handle_p99']:.0f}",
                    ]
                    for r in cache_rows
                ],
            )

        print("where the time goes (in process)", flush=True)
        steps = breakdown(iterations)
        report.add("## Where the time goes: the handler's steps, in process")
        report.add()
        report.add(
            "Each step timed alone (µs, p50 and mean), metrics in multiprocess mode and the "
            "admission log line formatted as JSON to /dev/null, as under `serve`. The framework "
            "and TLS cost is the floor's CPU per request above; the webhook's extra CPU per "
            "request is the difference of the two."
        )
        report.add()
        report.table(
            ["body", "step", "p50 µs", "mean µs"],
            [
                [
                    s["set"],
                    s["step"],
                    f"{s['p50']:.1f}",
                    "" if s["mean"] != s["mean"] else f"{s['mean']:.1f}",
                ]
                for s in steps
            ],
        )

        if args.profile:
            report.add(
                "## Profile: where the workers' Python time goes under load (py-spy --gil, 8 conns)"
            )
            report.add()
            if profiles.get("webhook") is None:
                report.add("py-spy is not installed (`.venv/bin/pip install py-spy`).")
                report.add()
            else:
                w, f = profiles["webhook"], profiles["floor"]
                report.table(
                    ["category", "webhook % of samples", "floor % of samples"],
                    [
                        [name, f"{w[name] * 100:.1f}", f"{f[name] * 100:.1f}"]
                        for name, _ in PROFILE_RULES
                        if w[name] or f[name]
                    ],
                )
            report.add(
                "cProfile of `Handler.handle` over the load mix, in process (top by own time):"
            )
            report.add()
            report.add("```")
            report.add(profile_top(10000))
            report.add("```")
            report.add()

        # Targets (issue 6).
        report.add("## Targets (issue 6)")
        report.add()
        trows = []
        for mix_name in MIXES:
            for name in ("c8", "c32"):
                pairs = ratios[f"{mix_name}:{name}"]["rps"]
                trows.append(
                    [
                        f"throughput >= 0.8x floor ({name}, {mix_name} mix)",
                        f"{median(pairs):.3f}x",
                        *verdict(pairs, lambda x: x >= 0.8),
                    ]
                )
            key = f"{mix_name}:r1000"
            for label, stat in (
                (
                    f"p99 at 1,000 req/s paced <= 1.25x floor ({mix_name} mix; wrk, from send)",
                    "p99",
                ),
                (f"same, from schedule ({mix_name} mix)", "co_p99"),
            ):
                pairs = ratios[key][stat]
                trows.append(
                    [
                        label,
                        f"{median(pairs):.3f}x ({ms(med('webhook', key, f'{stat}_us'))} vs "
                        f"{ms(med('floor', key, f'{stat}_us'))} ms)",
                        *verdict(pairs, lambda x: x <= 1.25),
                    ]
                )
        if cache_rows:
            top, empty = cache_rows[-1], cache_rows[0]
            for measure, source, key, none in (
                ("RSS", "--locusttests DIR", "rss_mb", "empty dir"),
                ("RSS", "cluster source, as deployed", "cluster_rss_mb", "none listed"),
                # What each worker adds to the pod: its own pages plus its share of the
                # master's, which RSS counts in full in every process.
                ("Pss", "cluster source", "cluster_pss_mb", "none listed"),
            ):
                worst = max(top[key])
                # Not a worker, so not the target's: the process that holds the watch.
                watcher = top[f"watcher_{measure.lower()}_mb"] if "cluster" in source else None
                trows.append(
                    [
                        f"{top['count']:,} LocustTests < 50 MB {measure} per worker ({source})",
                        f"{worst:.1f} MB ({none}: {max(empty[key]):.1f} MB)"
                        + (f"; the watcher process: {watcher:.1f} MB" if watcher else ""),
                        *measured_once(worst < 50, f"the larger of {len(top[key])} workers"),
                    ]
                )
            gets = [r["get_hit_ns"] for r in cache_rows[1:]]
            handles = [r["handle_p50"] for r in cache_rows[1:]]
            flat = max(handles) <= 1.25 * min(handles) and max(gets) < 2000
            trows.append(
                [
                    "lookup time independent of the number of LocustTests (10 / 1,000 / "
                    "10,000): handle p50 within 1.25x, a get (random keys: a dict, slower only "
                    "as it outgrows the CPU's caches) under 2 µs",
                    "get "
                    + " / ".join(f"{g:.0f}" for g in gets)
                    + " ns; handle p50 "
                    + " / ".join(f"{h:.0f}" for h in handles)
                    + " µs",
                    *measured_once(flat, "medians of rounds"),
                ]
            )
        if size_rows:
            big_row = size_rows[-1]
            trows.append(
                [
                    "200 KB pod < 10 ms p99 (in process)",
                    f"{big_row['p99'] / 1000:.2f} ms",
                    *measured_once(big_row["p99"] < 10000, f"p99 of {big_row['n']} calls"),
                ]
            )
        https_p99 = med("webhook", "c1", "p99_us", big_results)
        big_runs = len(big_results[("webhook", "c1")])
        trows.append(
            [
                "200 KB pod < 10 ms p99 (HTTPS, 1 conn; at 8 conns requests queue behind each "
                "other on 2 CPUs: see its table)",
                f"{ms(https_p99)} ms",
                *measured_once(https_p99 < 10000, f"median of {big_runs} run(s)"),
            ]
        )
        report.table(
            [
                "target",
                "measured",
                "95% interval of the pairs' median",
                "holds: median",
                "holds: whole interval",
            ],
            trows,
        )
        spent = [b - a for a, b in zip(counters, cpu_counters(), strict=True)]
        steal = spent[7] / sum(spent[:8])
        report.add(
            f"Total run time: {time.monotonic() - began:.0f} s; load average at the end: "
            + " ".join(f"{x:.2f}" for x in os.getloadavg())
            + " (the benchmark's own load generator and servers included); CPU time taken by the"
            + f" hypervisor from this machine during the run (steal): {steal:.1%}."
        )

    if not args.no_write:
        RESULTS.write_text(
            "\n".join(report.lines).rstrip()
            + "\n\n<!-- written by bench/run.py; rerun `make bench` to refresh -->\n"
        )
        print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
