"""``gridqueue demo``: a local fleet, a kill -9 in the middle of the work, and a report.

It needs nothing running: without ``GRIDQUEUE_REDIS_URL`` it starts a private redis-server.
It starts simulated GPU workers and a watchdog, submits a stream of jobs, kill -9s the
process group of a worker that is running jobs, waits for every job to end, and reports
what the contract promises: nothing lost, nothing shown twice, and how long each failover
took from the kill to the job running again elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from gridqueue.audit import audit, failover_latencies_ms, percentile
from gridqueue.client import GridQueue, Job
from gridqueue.embedded import EmbeddedRedis
from gridqueue.fleet import LocalFleet
from gridqueue.settings import Settings

SUBMIT_RATE_PER_S = 10.0
KILL_AFTER_S = 2.5


def run_demo(jobs: int = 60, workers: int = 3, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        url = os.environ.get("GRIDQUEUE_REDIS_URL")
        if url is None:
            server = EmbeddedRedis()
            stack.callback(server.cleanup)
            url = server.start()
            console.print(f"[dim]private redis-server on {url} ({server.binary})[/dim]")
        else:
            console.print(f"[dim]using GRIDQUEUE_REDIS_URL={url}[/dim]")
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gridqueue-demo-")))
        fleet = LocalFleet(url, log_dir)
        stack.callback(fleet.stop_all)
        names = [f"gpu-{i + 1}" for i in range(workers)]
        for name in names:
            fleet.start_worker(name, concurrency=2)
        fleet.start_watchdog()
        gq = GridQueue(settings=Settings(redis_url=url))
        stack.callback(gq.close)
        console.print(f"starting {workers} simulated GPU workers and a watchdog...")
        fleet.wait_alive(gq.ledger, names)
        console.print(f"fleet ready in {time.monotonic() - started:.1f} s\n")
        report = _drive(gq, fleet, names, jobs, console)
    report["wall_s"] = round(time.monotonic() - started, 1)
    _print_report(report, console)
    return report


def _drive(
    gq: GridQueue, fleet: LocalFleet, names: list[str], jobs: int, console: Console
) -> dict[str, Any]:
    rng = random.Random(7)
    submitted: list[Job] = []
    victim: str | None = None
    kill_ms = 0
    progress = Progress(
        TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), console=console
    )
    submit_bar = progress.add_task("submitted", total=jobs)
    done_bar = progress.add_task("ended", total=jobs)
    notes: list[str] = []
    t0 = time.monotonic()
    with Live(
        Group(progress, _fleet_table(gq, notes)), console=console, refresh_per_second=8
    ) as live:
        while True:
            elapsed = time.monotonic() - t0
            due = min(jobs, int(elapsed * SUBMIT_RATE_PER_S) + 1)
            while len(submitted) < due:
                i = len(submitted)
                payload = {"prompt": f"request {i}", "ms": rng.randint(600, 1600)}
                submitted.append(gq.submit("sim-llm", payload, workload="realtime"))
            if victim is None and elapsed >= KILL_AFTER_S:
                victim = _busiest(gq, names)
                if victim is not None:
                    kill_ms = gq.ledger.time_ms()
                    fleet.kill(victim)
                    notes.append(f"kill -9 {victim} (process group) at t={elapsed:.1f} s")
            counts = gq.ledger.counts()
            ended = sum(counts[s] for s in ("SUCCEEDED", "FAILED", "EXPIRED", "CANCELLED"))
            ended += counts["DEAD_LETTERED"]
            progress.update(submit_bar, completed=len(submitted))
            progress.update(done_bar, completed=min(ended, jobs))
            live.update(Group(progress, _fleet_table(gq, notes)))
            if len(submitted) == jobs and ended >= jobs and victim is not None:
                break
            if elapsed > 120:
                notes.append("gave up waiting after 120 s")
                break
            time.sleep(0.1)
    for job in submitted:  # every job must end: wait for the stragglers explicitly
        with contextlib.suppress(Exception):
            job.result(timeout=30)
    result = audit(gq.ledger, [j.id for j in submitted])
    records = [gq.get(j.id) for j in submitted]
    failovers = failover_latencies_ms(records, victim, kill_ms) if victim else []
    stats = gq.ledger.stats()
    return {
        **result.to_dict(),
        "victim": victim,
        "failovers_ms": sorted(failovers),
        "failover_p50_ms": percentile(failovers, 50),
        "failover_max_ms": max(failovers) if failovers else None,
        "attempts_per_worker": dict(
            Counter(a.worker for r in records for a in r.attempts if a.worker)
        ),
        "requeues": stats.get("requeues", 0),
    }


def _busiest(gq: GridQueue, names: list[str]) -> str | None:
    running = {w.name: len(w.running) for w in gq.ledger.workers() if w.name in names}
    name, count = max(running.items(), key=lambda item: item[1], default=(None, 0))
    return name if count > 0 else None


def _fleet_table(gq: GridQueue, notes: list[str]) -> Table:
    now_ms = gq.ledger.time_ms()
    table = Table(title="fleet", expand=False)
    for column in ("worker", "state", "heartbeat age", "running"):
        table.add_column(column)
    for worker in gq.ledger.workers():
        age = "-" if worker.last_heartbeat_ms is None else f"{now_ms - worker.last_heartbeat_ms} ms"
        style = "red" if worker.state.value != "ALIVE" else ""
        table.add_row(worker.name, worker.state.value, age, str(len(worker.running)), style=style)
    if notes:
        table.caption = " | ".join(notes)
    return table


def _print_report(report: dict[str, Any], console: Console) -> None:
    console.print()
    table = Table(title="gridqueue demo report")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("jobs submitted", report["submitted"]),
        ("succeeded", report["by_state"].get("SUCCEEDED", 0)),
        ("failed / other", sum(report["failed_by_reason"].values())),
        ("lost (never ended)", report["lost"]),
        ("duplicate visible results", report["duplicates"]),
        ("stale results discarded", report["stale_results_discarded"]),
        ("worker killed", report["victim"] or "-"),
        ("attempts requeued", report["requeues"]),
        (
            "failovers (kill -> running again)",
            ", ".join(f"{ms} ms" for ms in report["failovers_ms"]),
        ),
        ("wall time", f"{report['wall_s']} s"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    ok = report["lost"] == 0 and report["duplicates"] == 0
    verdict = "[green]contract held[/green]" if ok else "[red]CONTRACT BROKEN[/red]"
    console.print(f"{verdict}: every job ended exactly once.")
