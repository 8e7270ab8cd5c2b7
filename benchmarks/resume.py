"""Resume after a failover: a 10 s generation killed at 9 s, with and without resume.

A streaming ``sim-llm`` job (``{"tokens": 200, "ms_per_token": 50}``: 10 s) runs on a real
worker; 9 s after its claim the worker's whole process group gets SIGKILL. With resume
(a class with ``resume = true``) the next attempt continues from the last checkpoint and
the job ends about 1 s plus the failover after the kill; without (``resume = false``) it
starts over and ends about 10 s plus the failover after it. Both are measured in the same
run, on Redis server time, and printed with their ratio. A reader follows every job's
stream across the kill and must see each token once, in order.

Then a small drill: streaming jobs on three workers while workers are killed -9 and
restarted; every reader's view is audited for gaps and repeated chunks (both must be 0).

    python benchmarks/resume.py [--runs 1] [--drill-jobs 12] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridqueue.client import GridQueue  # noqa: E402
from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.fleet import LocalFleet, wait_for  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402
from gridqueue.states import JobState  # noqa: E402

CLASSES = """
[resume]
idempotent = true
max_attempts = 5
liveness_timeout_s = 2.0
stall_timeout_s = 30.0
default_deadline_s = 600.0
resume = true

[no-resume]
idempotent = true
max_attempts = 5
liveness_timeout_s = 2.0
stall_timeout_s = 30.0
default_deadline_s = 600.0
resume = false
"""


class Reader(threading.Thread):
    def __init__(self, gq: GridQueue, job_id: str) -> None:
        super().__init__(daemon=True)
        self.job = gq.job(job_id)
        self.chunks: list[Any] = []
        self.error: str | None = None

    def run(self) -> None:
        try:
            for chunk in self.job.stream(timeout=300):
                self.chunks.append(chunk)
        except Exception as exc:
            self.error = repr(exc)


def audit_stream(chunks: list[Any], tokens: int) -> dict[str, int]:
    """Gaps (tokens never seen), repeats (tokens seen twice), and out-of-order reads."""
    expected = [f"tok{i}" for i in range(tokens)]
    seen = set(chunks)
    order = [int(str(c)[3:]) for c in chunks if str(c).startswith("tok")]
    return {
        "gaps": sum(1 for t in expected if t not in seen),
        "repeats": len(chunks) - len(seen),
        "out_of_order": sum(1 for a, b in itertools.pairwise(order) if b < a),
    }


def killed_generation(
    gq: GridQueue,
    fleet: LocalFleet,
    workload: str,
    tokens: int,
    ms_per_token: int,
    kill_at_s: float,
) -> dict[str, Any]:
    job = gq.submit("sim-llm", {"tokens": tokens, "ms_per_token": ms_per_token}, workload=workload)
    reader = Reader(gq, job.id)
    reader.start()
    record = wait_for(
        lambda: (r := gq.get(job.id)).state is JobState.RUNNING and r, 60, what="claimed"
    )
    started_ms = record.attempts[-1].started_ms or gq.ledger.time_ms()
    victim = record.worker or ""
    wait_for(lambda: gq.ledger.time_ms() >= started_ms + kill_at_s * 1000, 60, 0.005)
    killed_ms = gq.ledger.time_ms()
    fleet.kill(victim, signal.SIGKILL)
    reader.join(timeout=300)
    final = gq.get(job.id)
    last = final.attempts[-1]
    return {
        "workload": workload,
        "state": final.state.value,
        "victim": victim,
        "finished_after_kill_s": ((final.ended_ms or killed_ms) - killed_ms) / 1000,
        "failover_s": ((last.started_ms or killed_ms) - killed_ms) / 1000,
        "resumed_from": final.stream_starts.get(last.n, 0),
        "emitted_by_last_attempt": final.stream_emits.get(last.n, 0),
        "reader_error": reader.error,
        **audit_stream(reader.chunks, tokens),
    }


def drill(gq: GridQueue, fleet: LocalFleet, names: list[str], jobs: int) -> dict[str, Any]:
    tokens = 40
    readers = []
    for i in range(jobs):
        workload = "resume" if i % 2 == 0 else "no-resume"
        job = gq.submit("sim-llm", {"tokens": tokens, "ms_per_token": 25}, workload=workload)
        reader = Reader(gq, job.id)
        reader.start()
        readers.append(reader)
    kills = 0
    for round_ in range(3):
        time.sleep(1.0)
        victim = names[round_ % len(names)]
        fleet.kill(victim, signal.SIGKILL)
        kills += 1
        fleet.processes.pop(victim, None)
        time.sleep(1.5)
        fleet.start_worker(victim, concurrency=2)  # the node comes back
        fleet.wait_alive(gq.ledger, [victim], timeout_s=90)
    totals = {"gaps": 0, "repeats": 0, "out_of_order": 0, "failed": 0, "errors": 0}
    for reader in readers:
        reader.join(timeout=300)
        for key, value in audit_stream(reader.chunks, tokens).items():
            totals[key] += value
        totals["errors"] += reader.error is not None
        totals["failed"] += gq.get(reader.job.id).state is not JobState.SUCCEEDED
    stats = gq.ledger.stats()
    return {
        "jobs": jobs,
        "kills": kills,
        **totals,
        "chunks_repeated_and_dropped": stats.get("stream_chunks_repeated", 0),
        "chunks_refused_from_zombies": stats.get("stream_chunks_refused", 0),
    }


def run(url: str, runs: int, drill_jobs: int, tmp: Path) -> dict[str, Any]:
    workloads = tmp / "workloads.toml"
    workloads.write_text(CLASSES, encoding="utf-8")
    fleet = LocalFleet(url, tmp / "logs", env={"GRIDQUEUE_WORKLOADS_FILE": str(workloads)})
    gq = GridQueue(settings=Settings(redis_url=url, workloads_file=workloads))
    try:
        names = ["gen-0", "gen-1", "gen-2"]
        for name in names:
            fleet.start_worker(name, concurrency=1)
        fleet.start_watchdog()
        fleet.wait_alive(gq.ledger, names)
        results: dict[str, list[dict[str, Any]]] = {"resume": [], "no-resume": []}
        for _ in range(runs):
            for workload in ("resume", "no-resume"):
                result = killed_generation(gq, fleet, workload, 200, 50, 9.0)
                results[workload].append(result)
                victim = result["victim"]
                fleet.processes.pop(victim, None)
                fleet.start_worker(victim, concurrency=1)
                fleet.wait_alive(gq.ledger, [victim], timeout_s=90)
        for name in names:  # the drill runs two jobs a node
            fleet.stop(name)
            fleet.start_worker(name, concurrency=2)
        fleet.wait_alive(gq.ledger, names, timeout_s=90)
        drilled = drill(gq, fleet, names, drill_jobs)
    finally:
        fleet.stop_all()
        gq.close()

    def median(workload: str, key: str) -> float:
        return statistics.median(r[key] for r in results[workload])

    with_s = median("resume", "finished_after_kill_s")
    without_s = median("no-resume", "finished_after_kill_s")
    return {
        "runs": results,
        "with_resume_s": with_s,
        "without_resume_s": without_s,
        "ratio": without_s / with_s if with_s else None,
        "drill": drilled,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--drill-jobs", type=int, default=12)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gridqueue-bench-") as tmp, EmbeddedRedis() as url:
        report = run(url, args.runs, args.drill_jobs, Path(tmp))
    if args.json:
        print(json.dumps(report, indent=2))
    print()
    for workload in ("resume", "no-resume"):
        for r in report["runs"][workload]:
            print(
                f"{workload:>9}: killed at 9 s of a 10 s generation; finished "
                f"{r['finished_after_kill_s']:.2f} s after the kill (failover "
                f"{r['failover_s']:.2f} s; last attempt resumed at token {r['resumed_from']}, "
                f"emitted {r['emitted_by_last_attempt']}); reader: {r['gaps']} gaps, "
                f"{r['repeats']} repeats, {r['out_of_order']} out of order"
            )
    print(
        f"finish after the kill, median: with resume {report['with_resume_s']:.2f} s, "
        f"without {report['without_resume_s']:.2f} s, ratio {report['ratio']:.1f}x"
    )
    d = report["drill"]
    print(
        f"drill: {d['jobs']} streaming jobs, {d['kills']} kill -9; gaps {d['gaps']}, repeated "
        f"chunks {d['repeats']}, out of order {d['out_of_order']}, failed {d['failed']}, "
        f"reader errors {d['errors']} (re-emitted chunks dropped by the ledger "
        f"{d['chunks_repeated_and_dropped']}, zombie chunks refused "
        f"{d['chunks_refused_from_zombies']})"
    )
    runs = report["runs"]["resume"] + report["runs"]["no-resume"]
    bad = sum(r["gaps"] + r["repeats"] + r["out_of_order"] for r in runs)
    ok = bad == 0 and d["gaps"] == 0 and d["repeats"] == 0 and d["out_of_order"] == 0
    sys.exit(0 if ok and not d["failed"] else 1)


if __name__ == "__main__":
    main()
