"""The monitor at fleet scale: every page, API call and /metrics with 1,000 workers and
100,000 jobs in the ledger, and how fast a transition reaches an open page.

It fills a private Redis through the ledger's own scripts (pipelined), starts the real
dashboard (``gridqueue dashboard``, uvicorn) against it, and times HTTP requests from a
client on the same machine. Then it makes transitions in the ledger and times how long
each takes to reach a Server-Sent Events client, and (when Playwright and a Chromium are
installed) an open browser page, where the worker's row must change without a reload.

    python benchmarks/monitor_scale.py [--workers 1000] [--jobs 100000] [--requests 20] [--json]

Targets (issue 8): each page and API call under 300 ms, /metrics under 500 ms, a
transition on an open page under 500 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.ledger import Ledger, connect_redis, dumps  # noqa: E402
from gridqueue.monitor.views import FleetView  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402
from gridqueue.states import Outcome  # noqa: E402

GIB = 2**30
MODELS = ["llama-70b", "llama-8b", "mistral-7b", "sdxl"]
WORKLOADS = ["realtime", "batch"]
BATCH = 2_000


def gpu(index: int) -> dict[str, Any]:
    return {
        "index": index,
        "uuid": f"GPU-{index:04d}",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total_bytes": 80 * GIB,
        "memory_used_bytes": 40 * GIB,
        "utilization_ratio": 0.7,
        "temperature_c": 64.0,
        "power_w": 450.0,
        "power_limit_w": 700.0,
        "xid_counts": {},
    }


def fill(ledger: Ledger, workers: int, jobs: int) -> list[str]:
    """Submit the jobs, register the fleet, then push the jobs through their lives,
    pipelined by batches."""
    names = [f"gpu-node-{i:04d}" for i in range(workers)]
    fit = {m: {"required_bytes": 8 * GIB, "largest_gpu_bytes": 80 * GIB} for m in MODELS}
    health = dumps({"probe": "nvml", "gpus": [gpu(0), gpu(1)], "reasons": []})
    pipe = ledger.client.pipeline(transaction=False)
    payload = dumps({"prompt": "benchmark " * 20, "max_tokens": 256})
    started = time.monotonic()
    ids = [f"job-{i:06d}" for i in range(jobs)]
    for first in range(0, jobs, BATCH):
        for i in range(first, min(first + BATCH, jobs)):
            ledger.queue_call(
                pipe, "submit", ids[i], MODELS[i % len(MODELS)], WORKLOADS[i % 2], payload, 0,
                "", 3600, 3_600_000, "1", 5_000, 300_000,
            )  # fmt: skip
        pipe.execute()
    print(f"  submitted {jobs:,} jobs ({time.monotonic() - started:.0f} s)", flush=True)
    for name in names:
        ledger.queue_call(
            pipe, "register", name, ",".join(MODELS), 1, "bench", 8, "{}", "nvml",
            dumps([gpu(0), gpu(1)]), dumps(fit), 3_600_000,
        )  # fmt: skip
    pipe.execute()
    for name in names:
        ledger.queue_call(pipe, "heartbeat", *ledger.heartbeat_args(name, 1, health, "HEALTHY"))
    pipe.execute()
    # 70% succeed, 10% are cancelled, 10% run now, 10% wait in their queue.
    for first in range(0, jobs, BATCH):
        for i in range(first, min(first + BATCH, jobs)):
            if i % 10 < 8:
                ledger.queue_call(pipe, "claim", ids[i], 1, names[i % workers], 100, "", 3_600_000)
        pipe.execute()
        for i in range(first, min(first + BATCH, jobs)):
            if i % 10 < 7:
                ledger.queue_call(pipe, "complete", ids[i], 1, names[i % workers], '{"text":"ok"}')
            elif i % 10 == 9:
                ledger.queue_call(pipe, "cancel", ids[i], "benchmark")
        pipe.execute()
    print(f"  ran them through their lives ({time.monotonic() - started:.0f} s)", flush=True)
    return names


def dead_letters_and_incidents(ledger: Ledger, names: list[str], count: int) -> None:
    """Poison jobs (dead letters with evidence) and workers declared dead (incidents)."""
    for k in range(count):
        job_id = f"poison-{k:04d}"
        ledger.submit(job_id, MODELS[0], "batch", '{"prompt": "poison"}', 0, None)
        for attempt, worker in enumerate(names[k % 50 : k % 50 + 3], start=1):
            ledger.claim(job_id, attempt, worker, 7, "")
            ledger.end_attempt(job_id, attempt, Outcome.WORKER_LOST, worker=worker, pid=7)


def declare_dead(settings: Settings, names: list[str]) -> None:
    quick = settings.model_copy(update={"stale_after_s": 0.05, "heartbeat_interval_s": 0.01})
    ledger = Ledger(connect_redis(quick.redis_url), quick)
    token = ledger.lease("bench", 600_000)[1]
    time.sleep(0.1)
    for name in names:
        ledger.declare_dead(name, token)
    ledger.resign(token)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed(client: httpx.Client, path: str, requests: int) -> dict[str, Any]:
    client.get(path)  # warm
    durations = []
    status = 0
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(path)
        durations.append((time.perf_counter() - started) * 1000)
        status = response.status_code
    durations.sort()
    return {
        "path": path,
        "status": status,
        "p50_ms": round(statistics.median(durations), 1),
        "p95_ms": round(durations[max(0, int(len(durations) * 0.95) - 1)], 1),
        "max_ms": round(durations[-1], 1),
        "bytes": len(response.content),
    }


def sse_latency(base: str, ledger: Ledger, names: list[str], samples: int) -> list[float]:
    """Quarantine a worker; time from the ledger's commit to the event on an SSE stream."""
    latencies: list[float] = []

    def listen(target: str, ready: threading.Event, seen: dict[str, float]) -> None:
        with (
            httpx.Client(timeout=None) as client,
            client.stream("GET", f"{base}/api/stream") as response,
        ):
            ready.set()
            for line in response.iter_lines():
                if target in line and "quarantined" in line:
                    seen["at"] = time.perf_counter()
                    return

    for k in range(samples):
        name = names[100 + k]
        seen: dict[str, float] = {}
        ready = threading.Event()
        thread = threading.Thread(target=listen, args=(name, ready, seen), daemon=True)
        thread.start()
        ready.wait(10)
        time.sleep(0.3)  # the stream's reader is at the end of the event stream
        started = time.perf_counter()
        ledger.quarantine(name, by="bench", reason="latency sample")
        thread.join(5)
        if "at" in seen:
            latencies.append((seen["at"] - started) * 1000)
        ledger.release(name, by="bench")
    return latencies


def browser_latency(base: str, ledger: Ledger, names: list[str], samples: int) -> list[float]:
    """An open /workers page: time from a quarantine to the row showing it, no reload."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return []
    if chromium is None:
        return []
    latencies = []
    with sync_playwright() as play:
        browser = play.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{base}/workers", wait_until="networkidle")
        for k in range(samples):
            name = names[20 + k]  # on the first page of the table (100 a page)
            row = f'[data-worker="{name}"]'
            page.wait_for_selector(row, timeout=30_000)
            time.sleep(0.5)
            started = time.perf_counter()
            ledger.quarantine(name, by="bench", reason="browser sample")
            page.wait_for_selector(f'{row}[data-state="QUARANTINED"]', timeout=10_000)
            latencies.append((time.perf_counter() - started) * 1000)
            ledger.release(name, by="bench")
        browser.close()
    return latencies


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"samples": 0}
    values = sorted(values)
    return {
        "samples": len(values),
        "p50_ms": round(statistics.median(values), 1),
        "max_ms": round(values[-1], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with EmbeddedRedis() as url:
        settings = Settings(redis_url=url, stale_after_s=3600, dispatch_grace_s=3600)
        ledger = Ledger(connect_redis(url), settings)
        print(f"filling: {args.workers:,} workers, {args.jobs:,} jobs", flush=True)
        names = fill(ledger, args.workers, args.jobs)
        dead_letters_and_incidents(ledger, names, 200)
        declare_dead(settings, names[-20:])
        print(f"ledger: {ledger.client.dbsize():,} keys", flush=True)

        view = FleetView(ledger)
        views = {}
        for label, call in {
            "overview": view.overview,
            "workers": view.workers,
            "jobs": lambda: view.jobs(limit=50),
            "jobs?state=RUNNING": lambda: view.jobs(state="RUNNING", limit=50),
            "jobs?model=sdxl&workload=batch": lambda: view.jobs(model="sdxl", workload="batch"),
            "failovers": view.failovers,
            "dead_letters": view.dead_letters,
        }.items():
            durations = []
            for _ in range(args.requests):
                started = time.perf_counter()
                call()
                durations.append((time.perf_counter() - started) * 1000)
            views[label] = round(statistics.median(durations), 1)

        port = free_port()
        env = {**os.environ, "GRIDQUEUE_REDIS_URL": url, "GRIDQUEUE_LOG_LEVEL": "WARNING"}
        server = subprocess.Popen(
            [sys.executable, "-m", "gridqueue.cli", "dashboard", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base, timeout=30) as client:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        if client.get("/readyz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise SystemExit("the dashboard did not start")
                    time.sleep(0.2)
                job = "job-000001"
                worker = names[0]
                paths = [
                    "/",
                    "/workers",
                    f"/workers/{worker}",
                    "/jobs",
                    "/jobs?state=RUNNING",
                    f"/jobs/{job}",
                    "/failovers",
                    "/dead-letters",
                    "/api/overview",
                    "/api/workers",
                    f"/api/workers/{worker}",
                    "/api/jobs",
                    "/api/jobs?state=SUCCEEDED&model=sdxl",
                    f"/api/jobs/{job}",
                    "/api/failovers",
                    "/api/dead-letters",
                    "/metrics",
                ]
                http = []
                for path in paths:
                    http.append(timed(client, path, args.requests))
                    row = http[-1]
                    print(
                        f"  {row['path']:<42} {row['status']}  p50 {row['p50_ms']:>7.1f} ms"
                        f"  p95 {row['p95_ms']:>7.1f} ms  max {row['max_ms']:>7.1f} ms"
                        f"  {row['bytes']:>9,} B",
                        flush=True,
                    )
            sse = summary(sse_latency(base, ledger, names, args.samples))
            browser = summary(browser_latency(base, ledger, names, args.samples))
        finally:
            server.terminate()
            server.wait(10)

    pages = [r for r in http if r["path"] != "/metrics"]
    metrics = next(r for r in http if r["path"] == "/metrics")
    worst_page = max(pages, key=lambda r: r["p95_ms"])
    print(f"views in-process (median ms): {views}")
    print(
        f"worst page/API p95: {worst_page['p95_ms']} ms ({worst_page['path']}); "
        f"target 300 ms: {'met' if worst_page['p95_ms'] < 300 else 'MISSED'}"
    )
    print(
        f"/metrics p95: {metrics['p95_ms']} ms; "
        f"target 500 ms: {'met' if metrics['p95_ms'] < 500 else 'MISSED'}"
    )
    print(f"transition -> SSE client: {sse}")
    if browser["samples"]:
        verdict = "met" if browser["max_ms"] < 500 else "MISSED"
        print(f"transition -> open browser page: {browser}; target 500 ms: {verdict}")
    else:
        print("transition -> open browser page: not measured (no Playwright or Chromium)")
    if args.json:
        print(
            json.dumps(
                {
                    "workers": args.workers,
                    "jobs": args.jobs,
                    "http": http,
                    "views_ms": views,
                    "sse": sse,
                    "browser": browser,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
