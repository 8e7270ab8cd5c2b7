"""Regenerate the dashboard's screenshots in docs/screenshots/.

It starts a private Redis, a small fleet of real processes (four `gridqueue worker` with
two simulated GPUs each, and a watchdog), drives it into a realistic state, starts the
real dashboard against it and saves a full-page PNG of each page from headless Chromium:

- node-4 is killed with kill -9 while it runs jobs: DEAD, a worker_dead incident, and
  its jobs run again elsewhere (a two-attempt timeline);
- node-3's GPU 1 reports Xid 79 (fallen off the bus): the watchdog quarantines it on
  its health verdict, a gpu_quarantine incident;
- jobs in most states: succeeded, failed (invalid input), running, queued behind them,
  expired, cancelled, and a poison job dead-lettered after taking down three nodes
  (written through the ledger's verbs before the fleet starts, as the tests do).

Nothing outside the private Redis is touched. Needs Playwright for Python (the dev
extras) and a Chromium; it never downloads one.

    python scripts/screenshots.py [--out docs/screenshots] [--chromium PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridqueue import GridQueue, Job  # noqa: E402
from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.faults import inject_fault  # noqa: E402
from gridqueue.fleet import LocalFleet  # noqa: E402
from gridqueue.ledger import Ledger, connect_redis  # noqa: E402
from gridqueue.probes.simulated import Fault  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402
from gridqueue.states import JobState, Outcome, WorkerState  # noqa: E402

T = TypeVar("T")
GIB = 2**30
NODES = ("node-1", "node-2", "node-3", "node-4")
TOKEN = "screenshots-only-token"
VIEWPORT = {"width": 1600, "height": 900}


def wait_for(predicate: Callable[[], T], timeout_s: float = 60.0, what: str = "") -> T:
    give_up_at = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > give_up_at:
            raise SystemExit(f"screenshots: not met within {timeout_s} s: {what or predicate}")
        time.sleep(0.05)


def log(message: str) -> None:
    print(f"screenshots: {message}", file=sys.stderr, flush=True)


# -- the fleet's state ---------------------------------------------------------------------


def poison(ledger: Ledger, jobs: dict[str, tuple[str, str]]) -> None:
    """Batch jobs (id -> model, prompt) whose attempts each took a node down (their
    children died under them), on three nodes: dead-lettered as poison. The nodes are
    registered for this and leave cleanly afterwards, before the real processes of the
    same names start."""
    gpu = {
        "index": 0,
        "uuid": "GPU-5e000000-0000-4000-8000-000000000000",
        "name": "Simulated H100 80GB",
        "memory_total_bytes": 80 * GIB,
        "memory_used_bytes": GIB,
    }
    models = sorted({model for model, _ in jobs.values()})
    fit = {model: {"required_bytes": 8 * GIB, "largest_gpu_bytes": 80 * GIB} for model in models}
    health = json.dumps({"probe": "simulated", "gpus": [gpu]})
    epochs = {}
    for node in NODES[:3]:
        epochs[node] = ledger.register(
            node, models, 4100, "rack-2", 2, "{}", "simulated", [gpu], fit
        )
        ledger.heartbeat(node, epochs[node], health, "HEALTHY")
    for job_id, (model, prompt) in jobs.items():
        ledger.submit(job_id, model, "batch", json.dumps({"prompt": prompt, "ms": 1500}), 0, None)
        for attempt, node in enumerate(NODES[:3], start=1):
            pid = 4200 + attempt
            assert ledger.claim(job_id, attempt, node, pid, "").status == "ok"
            error = "the worker process died under the job (signal 11)"
            ledger.end_attempt(job_id, attempt, Outcome.WORKER_LOST, error, worker=node, pid=pid)
        assert ledger.get(job_id).state is JobState.DEAD_LETTERED
    for node, epoch in epochs.items():
        assert ledger.unregister(node, epoch)


def running_on(ledger: Ledger, jobs: list[Job]) -> dict[str, str]:
    found = {}
    for job in jobs:
        record = ledger.get(job.id)
        if record.state is JobState.RUNNING and record.worker:
            found[job.id] = record.worker
    return found


def build_state(ledger: Ledger, gq: GridQueue, fleet: LocalFleet) -> dict[str, str]:
    """Drive the fleet into the state the screenshots show; returns the jobs to show."""
    poison(
        ledger,
        {
            "3f9c2b7e61d04a55b2e0c9a1d7e4f6a8": ("sim-llm", "decode this 40 MB base64 blob"),
            "b71e04c9d2a34f0e8c5a9d16e2f3a7b0": ("sim-embed", "embed a 2 GB attachment"),
        },
    )
    for node in NODES:
        models = "sim-llm,sim-embed" if node in ("node-1", "node-2") else "sim-llm"
        fleet.start_worker(node, models, concurrency=2, extra_args=("--sim-gpus", "2"))
    fleet.start_watchdog()
    fleet.wait_alive(ledger, list(NODES))
    # A new leader judges no one for a grace period: wait it out, so node-4's death below
    # is judged as such.
    wait_for(lambda: ledger.client.get(ledger.keys.leader), what="a watchdog leads")
    time.sleep(ledger.settings.stale_after_s + 1.5)
    log("fleet up")

    prompts = ["summarise the incident report", "translate to French", "classify: invoice"]
    done = [gq.submit("sim-llm", {"prompt": p, "ms": 300}) for p in prompts * 3]
    done.append(gq.submit("sim-embed", {"prompt": "embed this paragraph", "ms": 200}))
    failed = gq.submit("sim-llm", {"prompt": "bad input", "ms": 100, "fail": "invalid"})
    for job in done:
        job.result(timeout=60)
    with contextlib.suppress(Exception):
        failed.result(timeout=60)
    log("first jobs done")

    # node-4 dies with work on it: its jobs run again elsewhere.
    busy = [gq.submit("sim-llm", {"prompt": f"long answer {i}", "ms": 3000}) for i in range(8)]
    placed = wait_for(
        lambda: "node-4" in running_on(ledger, busy).values() and running_on(ledger, busy),
        what="node-4 runs a job",
    )
    moved = next(job_id for job_id, node in placed.items() if node == "node-4")
    fleet.kill("node-4", signal.SIGKILL)
    wait_for(lambda: ledger.worker("node-4").state is WorkerState.DEAD, what="node-4 DEAD")  # type: ignore[union-attr]
    log("node-4 declared dead")

    # node-3's second GPU falls off the bus: quarantined on its health verdict.
    inject_fault(ledger.settings, "node-3", 1, Fault(xid=(79,), gpu_lost=True))
    wait_for(
        lambda: ledger.worker("node-3").state is WorkerState.QUARANTINED,  # type: ignore[union-attr]
        what="node-3 quarantined",
    )
    log("node-3 quarantined by its health")
    for job in busy:
        job.result(timeout=90)

    # Now: node-1 and node-2 busy with long jobs, more waiting, one expired, one cancelled.
    reports = [
        gq.submit("sim-llm", {"prompt": f"batch report {i}", "ms": 600_000}, workload="batch")
        for i in range(4)
    ]
    wait_for(lambda: len(running_on(ledger, reports)) == 4, what="four long jobs running")
    waiting = [gq.submit("sim-llm", {"prompt": f"chat turn {i}", "ms": 500}) for i in range(3)]
    expired = gq.submit("sim-llm", {"prompt": "needs an answer now", "ms": 500}, deadline_s=1)
    waiting[-1].cancel()
    wait_for(lambda: ledger.get(expired.id).state is JobState.EXPIRED, what="a job expired")
    log("state ready")
    return {"moved": moved}


# -- the dashboard and the browser ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def dashboard(redis_url: str, log_path: Path) -> Iterator[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDQUEUE_")}
    env["GRIDQUEUE_DASHBOARD_TOKEN"] = TOKEN
    port = free_port()
    args = ["dashboard", "--port", str(port), "--redis", redis_url]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gridqueue.cli", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise SystemExit(f"the dashboard exited:\n{log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200
            return False

        wait_for(ready, what="the dashboard answers")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def live_transitions(gq: GridQueue, page: Any) -> None:
    """Transitions while the overview is open, for its live log: two jobs arrive (they
    wait: every live slot is busy) and one of them is cancelled."""
    arrived = [gq.submit("sim-embed", {"prompt": f"embed doc {i}", "ms": 200}) for i in (1, 2)]
    arrived[0].cancel()
    page.wait_for_selector("#event-log li[data-type=ended]", state="attached")


def shoot(url: str, gq: GridQueue, shown: dict[str, str], out: Path, chromium: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    pages: list[tuple[str, str, Callable[[Any], None] | None]] = [
        ("overview", "/", lambda page: live_transitions(gq, page)),
        ("workers", "/workers", None),
        ("worker", "/workers/node-3", None),
        ("jobs", "/jobs", None),
        ("job", f"/jobs/{shown['moved']}", None),
        (
            "failovers",
            "/failovers",
            lambda page: page.click("tbody[data-kind=worker_dead] summary"),
        ),
        ("dead-letters", "/dead-letters", None),
    ]
    saved = []
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
            page = context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            for name, path, prepare in pages:
                response = page.goto(url + path)
                if response is None or response.status != 200:
                    raise SystemExit(f"{path}: {response.status if response else 'no reply'}")
                page.wait_for_selector("#live-status[data-connected=true]", state="attached")
                if prepare is not None:
                    prepare(page)
                page.wait_for_timeout(600)  # the first live refresh after the stream's start
                target = out / f"{name}.png"
                page.screenshot(path=str(target), full_page=True, animations="disabled")
                saved.append(target)
                log(f"{target} ({target.stat().st_size // 1024} KB)")
        finally:
            browser.close()
    if errors:
        raise SystemExit(f"the browser reported errors: {errors}")
    return saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--chromium", default=shutil.which("chromium"))
    args = parser.parse_args(argv)
    if not args.chromium:
        raise SystemExit("screenshots: no chromium on PATH (Debian: apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)

    server = EmbeddedRedis()
    server.start()
    logs = Path(tempfile.mkdtemp(prefix="gridqueue-screenshots-"))
    fleet = LocalFleet(server.url, logs, env={"PYTHONPATH": str(ROOT)})
    settings = Settings(redis_url=server.url)
    ledger = Ledger(connect_redis(server.url), settings)
    gq = GridQueue(settings=settings)
    try:
        shown = build_state(ledger, gq, fleet)
        with dashboard(server.url, logs / "dashboard.log") as url:
            shoot(url, gq, shown, args.out, args.chromium)
    finally:
        for name in list(fleet.processes):  # its long jobs need not finish
            fleet.kill(name, signal.SIGKILL)
        fleet.stop_all()
        gq.close()
        ledger.client.close()
        server.cleanup()
        shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
