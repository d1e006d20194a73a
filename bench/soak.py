"""Soak (`make soak`, not in CI): `locust-webhook serve` against the local FakeKubeAPI for
--minutes (default 10) at --rate admissions/s (default 500) on kept-alive connections, while
LocustTests are created, updated and deleted every second.

Prints per minute: requests, errors, p50/p99/max latency and the RSS of every worker; and the
RSS of every worker and of the watcher process at the start and the end. Exits 1 on any error,
or when a worker was replaced during the run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fixtures import locusttest, operator_pod, review  # noqa: E402
from kubeapi import FakeKubeAPI  # noqa: E402
from server_process import serve  # noqa: E402

OTEL = {"enabled": True, "endpoint": "http://otel-collector:4317"}
STABLE = ("soak-otel", "soak-plain")


def bodies() -> list[bytes]:
    """The reviews clients send: master and worker pods of the stable LocustTests."""
    return [
        json.dumps(review(operator_pod(name, role))).encode()
        for name in STABLE
        for role in ("master", "worker")
    ]


def client_process(port: int, ca: str, rate: float, until: float, out: Any) -> None:
    """Send at `rate`/s on one kept-alive connection; report (second, latencies, errors)."""
    context = ssl.create_default_context(cafile=ca)
    payloads = bodies()
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    interval = 1.0 / rate
    next_at = time.monotonic()
    second = int(time.time())
    latencies: list[float] = []
    errors = 0
    index = 0
    while time.time() < until:
        now = time.monotonic()
        if now < next_at:
            time.sleep(next_at - now)
        next_at += interval
        started = time.monotonic()
        try:
            conn.request(
                "POST",
                "/mutate",
                body=payloads[index % len(payloads)],
                headers={"Content-Type": "application/json"},
            )
            answer = conn.getresponse()
            data = answer.read()
            if answer.status != 200 or b'"allowed":true' not in data:
                errors += 1
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
        latencies.append(time.monotonic() - started)
        index += 1
        if int(time.time()) != second:
            out.put((second, latencies, errors))
            second, latencies, errors = int(time.time()), [], 0
    out.put((second, latencies, errors))
    conn.close()


def churn(api: FakeKubeAPI, stop: threading.Event, counts: dict[str, int]) -> None:
    """Every second: create one LocustTest, update the previous one, delete the one before."""
    i = 0
    while not stop.wait(1.0):
        api.create(locusttest(f"churn-{i}", otel=OTEL if i % 2 else None))
        counts["created"] += 1
        if i >= 1:
            api.update(locusttest(f"churn-{i - 1}", otel=OTEL))
            counts["updated"] += 1
        if i >= 2:
            api.delete("default", f"churn-{i - 2}")
            counts["deleted"] += 1
        i += 1


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=500.0, help="admissions per second")
    parser.add_argument("--clients", type=int, default=8, help="kept-alive connections")
    parser.add_argument("--workers", type=int, default=2)
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_dir, FakeKubeAPI() as api:
        tmp = Path(tmp_dir)
        for name in STABLE:
            api.create(locusttest(name, otel=OTEL if name == "soak-otel" else None))
        env = {
            "KUBECONFIG": str(api.write_kubeconfig(tmp / "kubeconfig")),
            "KUBERNETES_SERVICE_HOST": "",
        }
        with serve(tmp, "--workers", str(options.workers), env=env) as server:
            pids = sorted(server.workers(options.workers))
            watcher = server.watcher()
            rss_start = {pid: rss_kib(pid) for pid in [*pids, watcher]}
            stop = threading.Event()
            counts = {"created": 0, "updated": 0, "deleted": 0}
            churner = threading.Thread(target=churn, args=(api, stop, counts), daemon=True)
            churner.start()
            start = time.time()
            until = start + options.minutes * 60
            out: Any = multiprocessing.Queue()
            procs = [
                multiprocessing.Process(
                    target=client_process,
                    args=(
                        server.port,
                        str(server.ca_file),
                        options.rate / options.clients,
                        until,
                        out,
                    ),
                )
                for _ in range(options.clients)
            ]
            for proc in procs:
                proc.start()
            minutes: dict[int, tuple[list[float], int]] = {}
            seconds: dict[int, set[int]] = {}
            print(f"soak: {options.rate:g}/s for {options.minutes:g} min, workers {pids}")
            print(f"{'minute':>6} {'requests':>9} {'rate/s':>7} {'errors':>6} "
                  f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}  rss KiB per worker")  # fmt: skip
            reported = 0
            while any(p.is_alive() for p in procs) or not out.empty():
                try:
                    second, latencies, errors = out.get(timeout=1)
                except Exception:  # queue.Empty: nothing this second
                    continue
                minute = int((second - start) // 60)
                bucket = minutes.setdefault(minute, ([], 0))
                bucket[0].extend(latencies)
                minutes[minute] = (bucket[0], bucket[1] + errors)
                seconds.setdefault(minute, set()).add(second)
                while reported < minute:
                    report(reported, minutes.get(reported, ([], 0)), seconds.get(reported), pids)
                    reported += 1
            for proc in procs:
                proc.join()
            for minute in sorted(m for m in minutes if m >= reported):
                report(minute, minutes[minute], seconds.get(minute), pids)
            stop.set()
            churner.join()
            rss_end = {pid: rss_kib(pid) for pid in [*pids, watcher]}
            alive = sorted(server.workers(options.workers, timeout=0))
    total = sum(len(lat) for lat, _ in minutes.values())
    errors = sum(err for _, err in minutes.values())
    print(
        f"churn: {counts['created']} created, {counts['updated']} updated, "
        f"{counts['deleted']} deleted"
    )
    for pid in pids:
        print(f"worker {pid}: RSS {rss_start[pid]} KiB -> {rss_end[pid]} KiB")
    print(f"watcher process {watcher}: RSS {rss_start[watcher]} KiB -> {rss_end[watcher]} KiB")
    print(f"total: {total} admissions, {errors} errors; workers unchanged: {alive == pids}")
    return 0 if errors == 0 and alive == pids and total > 0 else 1


def report(
    minute: int, bucket: tuple[list[float], int], seconds: set[int] | None, pids: list[int]
) -> None:
    latencies, errors = bucket
    span = len(seconds or ()) or 60
    rss = " ".join(str(rss_kib(pid)) for pid in pids if os.path.exists(f"/proc/{pid}"))
    print(
        f"{minute + 1:>6} {len(latencies):>9} {len(latencies) / span:>7.0f} {errors:>6} "
        f"{percentile(latencies, 0.5) * 1000:>7.2f} {percentile(latencies, 0.99) * 1000:>7.2f} "
        f"{max(latencies, default=0) * 1000:>7.2f}  {rss}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
