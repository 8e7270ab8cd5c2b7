"""Overhead: gridqueue against bare Celery and Celery with results, in one run.

Three kinds run the same no-op work, each on a fresh private Redis, with the same number
of workers and pool slots:

- **bare Celery**: as a careful user configures it (acks_late, prefetch 1, JSON, no
  events, no results): the producer never learns the answer;
- **Celery with results**: the same, plus Celery's Redis result backend, and the producer
  waits for every answer with ``AsyncResult.get()`` (what a Celery user who needs the
  answer runs);
- **gridqueue**: ``submit`` and ``result()``, with its ledger writes (submit, claim,
  progress, liveness, complete), heartbeats and a watchdog. The simulated handler's run
  counts for the audit are off (``SIM_LLM_COUNT_RUNS=0``): they are the tests'
  instrument, not what gridqueue costs, and nothing audits these runs.

For each it prints jobs per second and the ratios, and what the jobs cost Redis, which a
noisy machine does not blur: Redis commands per job (``INFO commandstats``, which counts
the commands inside scripts as well as the ``FCALL`` or ``EVALSHA`` that ran them) and Redis CPU per
job (``INFO cpu``, user + sys), both over the throughput window, background work
(heartbeats, the watchdog's ticks, idle ``BRPOP``s) included; and round trips per job
(``total_reads_processed``: one a request, or a pipeline read at once), each of which
costs Redis its handling whatever it carries (``benchmarks/job_cost.py`` prices a round
trip against the scripts' own work). For each kind, also the
CPU per job of the workers' main processes (the consumer, where Celery's events are made
and sent) and of their pool children (the task bodies), from ``/proc`` (user + sys).
Then the single-job latency,
one job at a time (submit of a 0 ms job -> its result), p50 and p99, against Celery with
results. Then, for gridqueue, where its commands go: a few jobs more under ``MONITOR``,
each command counted against the script that ran it.

gridqueue runs with Celery's task events and event heartbeats on (the default, what
Flower needs) and off (``GRIDQUEUE_CELERY_EVENTS=false``), so the report shows what events
cost. With ``--rounds N`` each kind runs N times (gridqueue on and off taking turns going
first), and the median of each figure is reported.

    python benchmarks/overhead.py [--jobs 500] [--events both|on|off] [--rounds 1]
        [--latency-jobs 200] [--profile-jobs 50] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from hashlib import sha1
from pathlib import Path
from typing import Any

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridqueue.audit import percentile  # noqa: E402
from gridqueue.client import GridQueue  # noqa: E402
from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.fleet import LocalFleet  # noqa: E402
from gridqueue.ledger import _SCRIPTS  # noqa: E402
from gridqueue.lua import script_source  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402

WORKERS = 2
CONCURRENCY = 2
# The Celery-with-results worker reads its Redis from here (set by this benchmark).
RESULTS_BROKER_ENV = "OVERHEAD_RESULTS_REDIS"


def make_results_app(url: str) -> Celery:
    """Celery as a user who needs the answer runs it: the bare configuration plus the
    Redis result backend (JSON results)."""
    app = Celery("results", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        worker_hijack_root_logger=False,
    )

    @app.task(name="results.noop")
    def noop(prompt: str) -> dict[str, str]:
        return {"prompt": prompt}

    return app


# The worker side: `celery -A benchmarks.overhead:results_app worker`. Nothing connects
# until a worker starts, which sets the variable.
results_app = make_results_app(os.environ.get(RESULTS_BROKER_ENV, "redis://127.0.0.1:6379/15"))


# -- what Redis did ------------------------------------------------------------------------


def _redis_counters(client: redis.Redis) -> tuple[Counter[str], Counter[str], float, int]:
    """Calls and microseconds per command so far, Redis's CPU seconds (user + sys, all
    threads), and the reads it served: one a round trip, however many commands a
    pipeline carried. A script's microseconds include those of the commands it ran."""
    stats = client.info("commandstats")
    calls = Counter(
        {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}
    )
    usec = Counter(
        {name.removeprefix("cmdstat_"): int(entry["usec"]) for name, entry in stats.items()}
    )
    cpu = client.info("cpu")
    reads = int(client.info("stats")["total_reads_processed"])
    return calls, usec, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), reads


class RedisWindow:
    """What Redis did between ``start()`` and ``stop()``, less the reads of the window."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.calls: Counter[str] = Counter()
        self.usec: Counter[str] = Counter()
        self.cpu_s = 0.0
        self.reads = 0

    def start(self) -> None:
        self._calls, self._usec, self._cpu_s, self._reads = _redis_counters(self.client)

    def stop(self) -> None:
        calls, usec, cpu_s, reads = _redis_counters(self.client)
        # The window's own reads: the three INFO calls that close it.
        self.reads = reads - self._reads - 3
        self.calls = calls - self._calls
        self.usec = usec - self._usec
        self.calls.pop("info", None)  # the window's own reads
        self.usec.pop("info", None)
        self.cpu_s = cpu_s - self._cpu_s
        self.client.close()

    def per_job(self, jobs: int) -> dict[str, Any]:
        return {
            "commands_per_job": sum(self.calls.values()) / jobs,
            "redis_cpu_us_per_job": self.cpu_s * 1e6 / jobs,
            # Reads served: one a request, or a pipeline read at once. (Not the scripts'
            # commandstats time against the rest: that is wall time, and on a busy
            # machine it counts the time Redis waited for a core.)
            "round_trips_per_job": self.reads / jobs,
            "commands_by_name_per_job": {
                name: round(calls / jobs, 2) for name, calls in self.calls.most_common()
            },
            "usec_by_name_per_job": {
                name: round(usec / jobs, 1) for name, usec in self.usec.most_common()
            },
        }


def script_names(ledger: Any) -> dict[str, str]:
    """The ledger's scripts by what a call names: the SHA of each (EVALSHA), and the
    function of each (FCALL)."""
    names = {sha1(script_source(name).encode()).hexdigest(): name for name in _SCRIPTS}
    names.update({f: name for name, f in ledger.scripts.library.functions.items()})
    return names


class ScriptProfile:
    """Every command Redis runs while it is on, counted against the script that ran it
    (Redis 7 feeds ``MONITOR`` an ``EVALSHA`` or ``FCALL`` before the commands it calls,
    and a script runs alone); ``scripts`` maps each script's SHA or function to its name."""

    def __init__(self, url: str, scripts: dict[str, str]) -> None:
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.scripts = scripts
        self.calls: Counter[str] = Counter()  # script name (or "direct") -> calls
        self.inner: Counter[tuple[str, str]] = Counter()  # (script, command) -> calls
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> ScriptProfile:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.client.ping()  # one more line wakes the reader
        self._thread.join(10)
        self.client.close()

    def _read(self) -> None:
        current = "direct"
        with self.client.monitor() as monitor:
            self._ready.set()
            while not self._stop.is_set():
                entry = monitor.next_command()
                words = str(entry["command"]).split()
                if not words:
                    continue
                name = words[0].upper()
                if entry.get("client_type") == "lua":
                    self.inner[(current, name)] += 1
                    continue
                if name in ("EVALSHA", "FCALL", "FCALL_RO") and len(words) > 1:
                    called = words[1].strip('"')
                    current = self.scripts.get(called, called[:8])
                    self.calls[current] += 1
                elif name == "EVAL":
                    current = "EVAL (inline script)"  # not gridqueue's: its run by SHA
                    self.calls[current] += 1
                else:
                    current = "direct"
                    self.calls[f"{name} (direct)"] += 1

    def per_job(self, jobs: int) -> dict[str, Any]:
        rows = {}
        for script, calls in self.calls.most_common():
            inner = {c: n for (s, c), n in self.inner.items() if s == script}
            rows[script] = {
                "calls_per_job": round(calls / jobs, 2),
                "inner_commands_per_job": round(sum(inner.values()) / jobs, 2),
                "inner_by_name_per_job": {
                    c: round(n / jobs, 2) for c, n in Counter(inner).most_common()
                },
            }
        return rows


# -- the three kinds -----------------------------------------------------------------------


def _start_celery_workers(
    target: str, url: str, log_dir: Path, env: dict[str, str]
) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(WORKERS):
        log = open(log_dir / f"{target.rsplit('.', 1)[-1]}-{i}.log", "ab")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", target, "worker",
                 "-n", f"celery-{i}@%h", "-c", str(CONCURRENCY), "--without-gossip",
                 "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"],
                env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
            )
        )  # fmt: skip
    return procs


def _stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _cpu_s(pid: int) -> float:
    """A process's CPU so far (user + sys, all its threads), from /proc; 0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pids: list[int]) -> list[int]:
    """The processes whose parent is one of ``pids`` (a worker's pool children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid in pids:
            found.append(int(entry.name))
    return found


class WorkerCpu:
    """The CPU the workers' main processes (consumer, event loop, Celery's events) and
    their pool children (the task bodies) spend between ``start()`` and ``stop()``, from
    /proc (user + sys): where a kind's Python time goes, beside Redis's."""

    def __init__(self, mains: list[int]) -> None:
        self.mains = mains
        self.children = _children(mains)

    def _now(self) -> tuple[float, float]:
        return (
            sum(_cpu_s(pid) for pid in self.mains),
            sum(_cpu_s(pid) for pid in self.children),
        )

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> None:
        main, children = self._now()
        self.main_s, self.children_s = main - self._start[0], children - self._start[1]

    def per_job(self, jobs: int) -> dict[str, float]:
        return {
            "main_cpu_us_per_job": self.main_s * 1e6 / jobs,
            "children_cpu_us_per_job": self.children_s * 1e6 / jobs,
        }


def _latencies_ms(run_one: Callable[[int], object], jobs: int) -> list[float]:
    samples = []
    for i in range(jobs):
        started = time.perf_counter()
        run_one(i)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def bare_celery(url: str, jobs: int, log_dir: Path) -> dict[str, Any]:
    # The producer: configured as benchmarks/bare_celery.py is, on this round's Redis.
    app = Celery("bare", broker=url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)
    client = redis.Redis.from_url(url)
    procs = _start_celery_workers(
        "benchmarks.bare_celery", url, log_dir, {"BARE_CELERY_BROKER": url}
    )
    try:
        app.send_task("bare.noop", args=["warm"])
        give_up = time.monotonic() + 60
        while not client.get("warm"):
            if time.monotonic() > give_up:
                raise RuntimeError("bare Celery workers did not start")
            time.sleep(0.05)
        window = RedisWindow(url)
        workers = WorkerCpu([proc.pid for proc in procs])
        window.start()
        workers.start()
        started = time.perf_counter()
        for _ in range(jobs):
            app.send_task("bare.noop", args=["done"])
        while int(client.get("done") or 0) < jobs:
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        workers.stop()
        window.stop()
        return {"jobs_per_s": jobs / elapsed, **window.per_job(jobs), **workers.per_job(jobs)}
    finally:
        app.close()
        client.close()
        _stop_processes(procs)


def celery_with_results(url: str, jobs: int, latency_jobs: int, log_dir: Path) -> dict[str, Any]:
    app = make_results_app(url)
    procs = _start_celery_workers(
        "benchmarks.overhead:results_app", url, log_dir, {RESULTS_BROKER_ENV: url}
    )
    try:
        app.send_task("results.noop", args=["warm"]).get(timeout=60)
        window = RedisWindow(url)
        workers = WorkerCpu([proc.pid for proc in procs])
        window.start()
        workers.start()
        started = time.perf_counter()
        handles = [app.send_task("results.noop", args=[str(i)]) for i in range(jobs)]
        for handle in handles:
            handle.get(timeout=300)
        elapsed = time.perf_counter() - started
        workers.stop()
        window.stop()
        latencies = _latencies_ms(
            lambda i: app.send_task("results.noop", args=[f"l{i}"]).get(timeout=60), latency_jobs
        )
        return {
            "jobs_per_s": jobs / elapsed,
            **window.per_job(jobs),
            **workers.per_job(jobs),
            "latencies_ms": latencies,
        }
    finally:
        app.close()
        _stop_processes(procs)


def gridqueue_run(
    url: str,
    jobs: int,
    latency_jobs: int,
    profile_jobs: int,
    log_dir: Path,
    events: bool,
    broker: str | None = None,
) -> dict[str, Any]:
    """``broker``: gridqueue's broker URL (amqp://...); None, the ledger's Redis. Only
    gridqueue's messages move: the baselines stay on Redis."""
    env = {
        "GRIDQUEUE_CELERY_EVENTS": str(events).lower(),
        "GRIDQUEUE_BROKER_URL": broker or "",
        "SIM_LLM_COUNT_RUNS": "0",  # the audit's run counts: not gridqueue's cost
    }
    fleet = LocalFleet(url, log_dir, env=env)
    gq = GridQueue(settings=Settings(redis_url=url, celery_events=events, broker_url=broker))
    try:
        names = [f"w{i}" for i in range(WORKERS)]
        for name in names:
            fleet.start_worker(name, concurrency=CONCURRENCY)
        fleet.start_watchdog()
        fleet.wait_alive(gq.ledger, names)
        gq.submit("sim-llm", {"prompt": "warm", "ms": 0}).result(timeout=30)
        workers = WorkerCpu([fleet.processes[name].pid for name in names])
        window = RedisWindow(url)
        window.start()
        workers.start()
        started = time.perf_counter()
        handles = [gq.submit("sim-llm", {"prompt": f"{i}", "ms": 0}) for i in range(jobs)]
        for job in handles:
            job.result(timeout=300)
        elapsed = time.perf_counter() - started
        workers.stop()
        window.stop()
        latencies = _latencies_ms(
            lambda i: gq.submit("sim-llm", {"prompt": f"l{i}", "ms": 0}).result(timeout=60),
            latency_jobs,
        )
        report = {
            "jobs_per_s": jobs / elapsed,
            **window.per_job(jobs),
            **workers.per_job(jobs),
            "latencies_ms": latencies,
        }
        if profile_jobs:
            scripts = script_names(gq.ledger)
            with ScriptProfile(url, scripts) as profile:
                batch = [
                    gq.submit("sim-llm", {"prompt": f"p{i}", "ms": 0}) for i in range(profile_jobs)
                ]
                for job in batch:
                    job.result(timeout=120)
            report["scripts_per_job"] = profile.per_job(profile_jobs)
        return report
    finally:
        fleet.stop_all()
        gq.close()


# -- the report ----------------------------------------------------------------------------


def _median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(run[key]) for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument(
        "--events",
        choices=["both", "on", "off"],
        default="both",
        help="run gridqueue with Celery events on, off, or both (default)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of each kind; median")
    parser.add_argument("--latency-jobs", type=int, default=200, help="one at a time; 0: skip")
    parser.add_argument(
        "--profile-jobs", type=int, default=50, help="gridqueue jobs under MONITOR; 0: skip"
    )
    parser.add_argument(
        "--broker", help="gridqueue's broker URL (amqp://...); default the ledger's Redis"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.jobs < 1 or args.rounds < 1 or args.latency_jobs < 0 or args.profile_jobs < 0:
        parser.error("--jobs and --rounds must be at least 1; --latency-jobs, --profile-jobs >= 0")
    kinds = {"both": [True, False], "on": [True], "off": [False]}[args.events]
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "results": [], "on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="gridqueue-bench-") as tmp:
        for round_ in range(args.rounds):
            log_dir = Path(tmp) / str(round_)
            log_dir.mkdir()
            with EmbeddedRedis() as url:
                runs["bare"].append(bare_celery(url, args.jobs, log_dir))
            with EmbeddedRedis() as url:
                runs["results"].append(
                    celery_with_results(url, args.jobs, args.latency_jobs, log_dir)
                )
            # On and off take turns going first: neither always runs on a warmer machine.
            for events in kinds if round_ % 2 == 0 else kinds[::-1]:
                with EmbeddedRedis() as url:
                    run = gridqueue_run(
                        url, args.jobs, args.latency_jobs, args.profile_jobs,
                        log_dir / f"gq-{events}", events, args.broker,
                    )  # fmt: skip
                runs["on" if events else "off"].append(run)
    labels = {
        "bare": "bare Celery",
        "results": "Celery + results",
        "on": "gridqueue, events on",
        "off": "gridqueue, events off",
    }
    bare_rate = _median_of(runs["bare"], "jobs_per_s")
    results_rate = _median_of(runs["results"], "jobs_per_s")
    report: dict[str, Any] = {
        "jobs": args.jobs,
        "rounds": args.rounds,
        "workers": WORKERS,
        "slots_per_worker": CONCURRENCY,
        "kinds": {},
    }
    print(
        f"{args.jobs} no-op jobs, {WORKERS} workers x {CONCURRENCY} slots, {args.rounds} round(s)"
    )
    print(f"{'':24}{'jobs/s':>8}{'/bare':>7}{'/results':>9}{'cmds/job':>10}{'Redis CPU/job':>15}")
    for kind, label in labels.items():
        if not runs[kind]:
            continue
        rate = _median_of(runs[kind], "jobs_per_s")
        commands = _median_of(runs[kind], "commands_per_job")
        cpu_us = _median_of(runs[kind], "redis_cpu_us_per_job")
        summary: dict[str, Any] = {
            "jobs_per_s": round(rate, 1),
            "ratio_to_bare": round(rate / bare_rate, 3),
            "ratio_to_results": round(rate / results_rate, 3),
            "commands_per_job": round(commands, 1),
            "redis_cpu_us_per_job": round(cpu_us, 1),
            "commands_by_name_per_job": runs[kind][-1]["commands_by_name_per_job"],
            "usec_by_name_per_job": runs[kind][-1]["usec_by_name_per_job"],
            "runs_jobs_per_s": [round(r["jobs_per_s"], 1) for r in runs[kind]],
        }
        latencies = [ms for run in runs[kind] for ms in run.get("latencies_ms", [])]
        if latencies:
            summary["latency_p50_ms"] = round(percentile(latencies, 50), 2)
            summary["latency_p99_ms"] = round(percentile(latencies, 99), 2)
        summary["round_trips_per_job"] = round(_median_of(runs[kind], "round_trips_per_job"), 1)
        for key in ("main_cpu_us_per_job", "children_cpu_us_per_job"):
            if key in runs[kind][-1]:
                summary[key] = round(_median_of(runs[kind], key))
        if "scripts_per_job" in runs[kind][-1]:
            summary["scripts_per_job"] = runs[kind][-1]["scripts_per_job"]
        report["kinds"][kind] = summary
        print(
            f"{label:24}{rate:8.0f}{rate / bare_rate:7.2f}{rate / results_rate:9.2f}"
            f"{commands:10.1f}{cpu_us:12.0f} µs"
        )
    for kind, summary in report["kinds"].items():
        if "main_cpu_us_per_job" in summary:
            print(
                f"{labels[kind]}: CPU per job in the workers' main processes "
                f"{summary['main_cpu_us_per_job']} µs, in their pool children "
                f"{summary['children_cpu_us_per_job']} µs"
            )
    print(
        "round trips to Redis per job (reads served): "
        + ", ".join(
            f"{labels[kind]} {summary['round_trips_per_job']:.1f}"
            for kind, summary in report["kinds"].items()
        )
    )
    if runs["on"] and runs["off"]:
        on, off = _median_of(runs["on"], "jobs_per_s"), _median_of(runs["off"], "jobs_per_s")
        report["events_cost"] = round(1 - on / off, 3)  # share of throughput events take
        print(f"events cost {100 * (1 - on / off):.1f}% of gridqueue's throughput")
    if args.latency_jobs:
        print(f"single-job latency (submit of a 0 ms job -> its result), {args.latency_jobs} jobs:")
        for kind in ("results", "on", "off"):
            summary = report["kinds"].get(kind)
            if summary and "latency_p50_ms" in summary:
                print(
                    f"  {labels[kind]:22} p50 {summary['latency_p50_ms']:.1f} ms, "
                    f"p99 {summary['latency_p99_ms']:.1f} ms"
                )
    default = "on" if runs["on"] else "off"
    ours = report["kinds"][default]
    print(f"{labels[default]}: commands per job by name (INFO commandstats)")
    top = list(ours["commands_by_name_per_job"].items())[:12]
    print("  " + ", ".join(f"{name} {calls:.1f}" for name, calls in top))
    print(
        f"{labels[default]}: Redis µs per job by command "
        "(INFO commandstats; a script's figure includes its commands)"
    )
    top_usec = list(ours["usec_by_name_per_job"].items())[:12]
    print("  " + ", ".join(f"{name} {usec:.1f}" for name, usec in top_usec))
    if "scripts_per_job" in ours:
        print(f"{labels[default]}: per job, by script (MONITOR, {args.profile_jobs} jobs)")
        for script, row in ours["scripts_per_job"].items():
            inner = ", ".join(
                f"{c} {n:.1f}" for c, n in list(row["inner_by_name_per_job"].items())[:6]
            )
            print(
                f"  {script:28} {row['calls_per_job']:5.1f} calls, "
                f"{row['inner_commands_per_job']:5.1f} inner commands"
                + (f" ({inner})" if inner else "")
            )
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
