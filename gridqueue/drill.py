"""``gridqueue drill``: a fault drill against a running fleet.

It submits a steady load and injects faults on a schedule, by mix: kill -9 of a node, kill
of a task child, SIGSTOP/SIGCONT of a node (a zombie), SIGSTOP of a child (a stall), and
simulated GPU faults. It then waits for every job to end and reports, per fault kind, the
time to detect it and the time until the affected jobs ran again (p50, p99, max), plus
the contract's figures: lost jobs and duplicate visible results, which must both be 0.

By default it runs on a local fleet it starts itself (on a private Redis unless
``--redis`` is given). It only ever signals processes it started, and injects GPU faults
only into workers it started or that are named with ``--target``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gridqueue.audit import audit, percentile
from gridqueue.client import GridQueue
from gridqueue.embedded import EmbeddedRedis
from gridqueue.errors import AdmissionError, ConfigError
from gridqueue.faults import clear_faults, inject_fault
from gridqueue.fleet import LocalFleet
from gridqueue.probes.simulated import Fault
from gridqueue.records import JobRecord
from gridqueue.settings import Settings
from gridqueue.states import WorkerState

FAULT_KINDS = ("kill9", "child", "zombie", "stall", "gpu")


@dataclass
class Injection:
    kind: str
    worker: str
    at_ms: int
    attempts: list[tuple[str, int]]  # (job, attempt) running on the target when injected
    detected_ms: int | None = None
    resumed_ms: list[int] = field(default_factory=list)


@dataclass
class DrillPlan:
    duration_s: float = 60.0
    rate_per_s: float = 4.0
    workers: int = 5
    concurrency: int = 2
    fault_interval_s: float = 8.0
    faults: tuple[str, ...] = FAULT_KINDS
    seed: int = 1
    zombie_s: float = 2.5
    gpu_fault_s: float = 3.0
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown or not self.faults:
            raise ConfigError(
                f"unknown fault kinds {sorted(unknown)}; choose from {', '.join(FAULT_KINDS)}"
            )


class Drill:
    def __init__(self, gq: GridQueue, fleet: LocalFleet, plan: DrillPlan, console: Console):
        self.gq = gq
        self.fleet = fleet
        self.plan = plan
        self.console = console
        self.rng = random.Random(plan.seed)
        self.jobs: list[str] = []
        self.refused: int = 0
        self.injections: list[Injection] = []
        self._undo: list[tuple[float, Callable[[], None]]] = []
        self._replacements = 0

    # -- the run --------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        plan = self.plan
        started = time.monotonic()
        next_fault = started + min(5.0, plan.fault_interval_s)
        next_sweep = started
        submitted = 0
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=self.console
        )
        with progress:
            task = progress.add_task("drill", total=plan.duration_s)
            while (elapsed := time.monotonic() - started) < plan.duration_s:
                while submitted < int(elapsed * plan.rate_per_s) + 1:
                    self._submit(submitted)
                    submitted += 1
                if time.monotonic() >= next_fault:
                    self._inject(plan.faults[len(self.injections) % len(plan.faults)])
                    next_fault += plan.fault_interval_s
                self._run_undo()
                if time.monotonic() >= next_sweep:
                    self._recycle_quarantined()
                    next_sweep = time.monotonic() + 1.0
                progress.update(
                    task,
                    completed=elapsed,
                    description=f"jobs {len(self.jobs)}  faults {len(self.injections)}",
                )
                time.sleep(0.02)
        self._run_undo(force=True)
        self.console.print("load done; waiting for every job to end...")
        self._wait_all(timeout_s=240)
        return self._report(time.monotonic() - started)

    def _submit(self, i: int) -> None:
        roll = self.rng.random()
        payload: dict[str, Any] = {"prompt": f"drill {i}", "ms": self.rng.randint(200, 2000)}
        workload = "realtime"
        if roll < 0.01:
            payload["crash"] = True  # a poison job: it must be dead-lettered, not spread
        elif roll < 0.06:
            workload = "exclusive"
        elif roll < 0.25:
            workload = "batch"
        try:
            self.jobs.append(self.gq.submit("sim-llm", payload, workload=workload).id)
        except AdmissionError:
            self.refused += 1  # refused up front, with a reason: not accepted, not lost

    # -- faults ---------------------------------------------------------------------

    def _own_workers(self) -> list[str]:
        return [p.name for p in self.fleet.processes.values() if p.kind == "worker" and p.alive()]

    def _busy_worker(self) -> str | None:
        records = {w.name: w for w in self.gq.ledger.workers()}
        candidates = [
            (len(records[n].running), n)
            for n in self._own_workers()
            if n in records and records[n].state is WorkerState.ALIVE and records[n].running
        ]
        return max(candidates)[1] if candidates else None

    def _inject(self, kind: str) -> None:
        if kind == "gpu" and self.plan.targets:
            worker: str | None = self.rng.choice(self.plan.targets)
        else:
            worker = self._busy_worker()
        if worker is None:
            return
        record = self.gq.ledger.worker(worker)
        held = [_split(m) for m in (record.running if record else [])]
        if kind in ("child", "stall"):
            if not held:
                return
            held = [self.rng.choice(held)]
        now_ms = self.gq.ledger.time_ms()
        injection = Injection(kind, worker, now_ms, held)
        proc = self.fleet.processes.get(worker)
        if kind == "kill9" and proc:
            proc.signal_group(signal.SIGKILL)
            self._later(0.0, lambda: self._replace(worker))
        elif kind == "zombie" and proc:
            proc.signal_group(signal.SIGSTOP)
            self._later(self.plan.zombie_s, lambda: proc.signal_group(signal.SIGCONT))
        elif kind in ("child", "stall"):
            pid = self.gq.get(held[0][0]).attempts[held[0][1] - 1].pid
            if not pid:
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL if kind == "child" else signal.SIGSTOP)
        elif kind == "gpu":
            inject_fault(self.gq.settings, worker, 0, Fault(xid=(79,)))
            self._later(self.plan.gpu_fault_s, lambda: clear_faults(self.gq.settings, worker))
        else:
            return
        self.injections.append(injection)

    def _recycle_quarantined(self) -> None:
        """Play the orchestrator for nodes the watchdog quarantined for repeated stalls:
        no health signal will re-admit them, so replace them with fresh nodes."""
        for name in self._own_workers():
            record = self.gq.ledger.worker(name)
            if (
                record
                and record.state is WorkerState.QUARANTINED
                and record.quarantined_by == "watchdog"
            ) and not record.running:  # drained: nothing left to finish there
                self.fleet.stop(name)
                self._replace(name)

    def _replace(self, dead: str) -> None:
        """An orchestrator restarts a dead node: keep the fleet's capacity."""
        self.fleet.processes.pop(dead, None)
        self._replacements += 1
        self.fleet.start_worker(f"drill-r{self._replacements}", concurrency=self.plan.concurrency)

    def _later(self, delay_s: float, action: Callable[[], None]) -> None:
        self._undo.append((time.monotonic() + delay_s, action))

    def _run_undo(self, force: bool = False) -> None:
        now = time.monotonic()
        due = [(t, a) for t, a in self._undo if force or t <= now]
        self._undo = [(t, a) for t, a in self._undo if not (force or t <= now)]
        for _, action in due:
            with contextlib.suppress(Exception):
                action()

    def _wait_all(self, timeout_s: float) -> None:
        give_up_at = time.monotonic() + timeout_s
        for job_id in self.jobs:
            remaining = give_up_at - time.monotonic()
            if remaining <= 0:
                return
            with contextlib.suppress(Exception):
                self.gq.ledger.wait(job_id, remaining)

    # -- the report -----------------------------------------------------------------

    def _measure(self, records: dict[str, JobRecord]) -> None:
        events = self.gq.ledger.events(count=10_000_000)
        for inj in self.injections:
            if inj.kind in ("kill9", "zombie"):
                inj.detected_ms = _first(events, "worker_dead", inj.worker, inj.at_ms)
            elif inj.kind == "gpu":
                inj.detected_ms = _first(events, "worker_quarantined", inj.worker, inj.at_ms)
            for job_id, n in inj.attempts:
                record = records.get(job_id)
                if record is None or len(record.attempts) < n:
                    continue
                ended = record.attempts[n - 1]
                if inj.kind in ("child", "stall") and inj.detected_ms is None and ended.ended_ms:
                    inj.detected_ms = ended.ended_ms
                following = record.attempts[n] if len(record.attempts) > n else None
                if following is not None and following.started_ms is not None:
                    inj.resumed_ms.append(following.started_ms - inj.at_ms)

    def _report(self, wall_s: float) -> dict[str, Any]:
        records = {job_id: self.gq.get(job_id) for job_id in self.jobs}
        self._measure(records)
        result = audit(self.gq.ledger, self.jobs)
        per_kind: dict[str, dict[str, Any]] = {}
        grouped: dict[str, list[Injection]] = defaultdict(list)
        for inj in self.injections:
            grouped[inj.kind].append(inj)
        for kind, items in grouped.items():
            detect = [i.detected_ms - i.at_ms for i in items if i.detected_ms is not None]
            resume = [ms for i in items for ms in i.resumed_ms]
            per_kind[kind] = {
                "injected": len(items),
                "detect_ms": _summary(detect),
                "running_again_ms": _summary(resume),
                "jobs_moved": len(resume),
            }
        stats = self.gq.ledger.stats()
        first = stats.get("first_placements", 0)
        bad = stats.get("bad_first_placements", 0)
        return {
            "wall_s": round(wall_s, 1),
            "plan": {
                "duration_s": self.plan.duration_s,
                "rate_per_s": self.plan.rate_per_s,
                "workers": self.plan.workers,
                "faults": list(self.plan.faults),
            },
            **result.to_dict(),
            "refused_at_submit": self.refused,
            "dead_lettered": result.by_state.get("DEAD_LETTERED", 0),
            "faults_injected": len(self.injections),
            "per_fault": per_kind,
            "bad_first_placement_rate": bad / first if first else 0.0,
            "counters": stats,
        }


def _split(member: str) -> tuple[str, int]:
    job_id, _, n = member.rpartition(".")
    return job_id, int(n)


def _first(events: list[dict[str, str]], kind: str, worker: str, after_ms: int) -> int | None:
    for event in events:
        if event["type"] == kind and event.get("worker") == worker and int(event["ts"]) >= after_ms:
            return int(event["ts"])
    return None


def _summary(values: list[int]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values),
    }


def run_drill(
    plan: DrillPlan, redis_url: str | None, start_watchdog: bool, console: Console
) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        if redis_url is None:
            server = EmbeddedRedis()
            stack.callback(server.cleanup)
            redis_url = server.start()
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gridqueue-drill-")))
        fleet = LocalFleet(redis_url, log_dir)
        stack.callback(fleet.stop_all)
        gq = GridQueue(settings=Settings(redis_url=redis_url))
        stack.callback(gq.close)
        names = [f"drill-w{i + 1}" for i in range(plan.workers)]
        for name in names:
            fleet.start_worker(name, concurrency=plan.concurrency)
        if start_watchdog:
            fleet.start_watchdog("drill-watchdog-a")
            fleet.start_watchdog("drill-watchdog-b")
        fleet.wait_alive(gq.ledger, names)
        console.print(f"fleet: {plan.workers} workers x {plan.concurrency} slots on {redis_url}")
        return Drill(gq, fleet, plan, console).run()


def print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title="fault drill report")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in (
        ("jobs submitted", report["submitted"]),
        ("succeeded", report["by_state"].get("SUCCEEDED", 0)),
        (
            "failed, by reason",
            ", ".join(f"{k}: {v}" for k, v in report["failed_by_reason"].items()),
        ),
        ("dead-lettered", report["dead_lettered"]),
        ("refused at submit", report["refused_at_submit"]),
        ("lost", report["lost"]),
        ("duplicate visible results", report["duplicates"]),
        ("stale results discarded", report["stale_results_discarded"]),
        ("faults injected", report["faults_injected"]),
        ("bad first placements", f"{report['bad_first_placement_rate']:.1%}"),
        ("wall time", f"{report['wall_s']} s"),
    ):
        table.add_row(name, str(value or 0) if value != "" else "-")
    console.print(table)
    faults = Table(title="per fault kind (ms; Redis server time)")
    for column in ("fault", "injected", "detect p50", "detect p99", "detect max",
                   "running again p50", "p99", "max", "jobs moved"):  # fmt: skip
        faults.add_column(column, justify="right")
    for kind, row in sorted(report["per_fault"].items()):
        d, r = row["detect_ms"], row["running_again_ms"]
        faults.add_row(
            kind, str(row["injected"]), _ms(d["p50"]), _ms(d["p99"]), _ms(d["max"]),
            _ms(r["p50"]), _ms(r["p99"]), _ms(r["max"]), str(row["jobs_moved"]),
        )  # fmt: skip
    console.print(faults)
    ok = report["lost"] == 0 and report["duplicates"] == 0
    console.print(
        "[green]contract held: 0 lost, 0 duplicates[/green]" if ok else "[red]CONTRACT BROKEN[/red]"
    )


def _ms(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.0f}"
