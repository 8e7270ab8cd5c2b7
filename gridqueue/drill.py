"""``gridqueue drill``: a fault drill against a running fleet.

It submits a steady load and injects faults on a schedule, by mix:

- ``kill9``: kill -9 of a node's process group (an orchestrator starts a fresh node);
- ``child``: kill -9 of one task child;
- ``zombie``: SIGSTOP of a node, SIGCONT ``zombie_s`` later;
- ``stall``: SIGSTOP of one task child;
- ``gpu``: Xid 79 on a simulated GPU, cleared ``gpu_fault_s`` later;
- ``taken``: a node killed right after the broker handed it a message, before it claimed
  it: a short-lived consumer configured like a gridqueue worker process takes one message
  (kombu moves it to its ``unacked`` hash) and is SIGKILLed;
- ``leader``: kill -9 of the leading watchdog (a fresh standby is started in its place);
- ``redis``: kill -9 of the drill's own redis-server (AOF, ``appendfsync everysec``) and a
  restart on the same port and directory ``redis_down_s`` later;
- ``partition``: a node that reaches Redis through a TCP proxy is cut off for
  ``partition_s`` (longer than ``stale_after_s``), then healed: a silent partition
  (packets lost, connections left open), so the node must fence itself before the
  watchdog moves its jobs.

While it runs, and while it drains, it samples the ledger every ``sample_s``: each job's
state and attempt, since when they are unchanged, and the first terminal state and result
the producer read. At the end it reports, per fault kind, the time to detect it and the
time until the affected jobs ran again (p50, p99, max), and the contract's figures, which
must all be 0 for the drill to pass:

- **lost**: jobs not terminal when the drain (bounded by ``drain_s``) gave up, or gone
  from the ledger;
- **duplicate visible results** (see :mod:`gridqueue.audit`): two succeeded attempts, a
  result that is not the succeeded attempt's own, or a result that changed after the
  producer read it;
- **exclusive jobs run more than once**: jobs of a non-idempotent class whose handler
  started more than once, as the handler itself counted its runs;
- **stuck**: jobs left QUEUED or RUNNING, with no new attempt, longer than
  ``stale_after_s + dispatch_grace_s + liveness_timeout_s`` of their class (plus the
  sampling period and two watchdog ticks) after the last fault ended: nothing was moving
  them. The clock of a QUEUED job also waits for its backoff and for a free slot in the
  fleet; a RUNNING job's for the work its payload asks (``ms``). An EXPIRED job that was
  not ended by its deadline counts as stuck too.

By default it runs on a local fleet it starts itself (on a private Redis unless
``--redis`` is given). It only ever signals processes it started, and injects GPU faults
only into workers it started or that are named with ``--target``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gridqueue.audit import Seen, audit, percentile
from gridqueue.celeryapp import priority_lists
from gridqueue.chaosproxy import TcpProxy
from gridqueue.client import GridQueue
from gridqueue.embedded import EmbeddedRedis
from gridqueue.errors import AdmissionError, ConfigError, GridQueueError
from gridqueue.faults import clear_faults, inject_fault
from gridqueue.fleet import LocalFleet
from gridqueue.keys import KOMBU_UNACKED, queue_for_model, split_attempt_id
from gridqueue.probes.simulated import Fault
from gridqueue.records import JobRecord
from gridqueue.settings import Settings
from gridqueue.states import JobState, WorkerState

FAULT_KINDS = (
    "kill9", "child", "zombie", "stall", "gpu", "taken", "partition", "leader", "redis",
)  # fmt: skip
MODEL = "sim-llm"


@dataclass
class Injection:
    kind: str
    worker: str
    at_ms: int
    attempts: list[tuple[str, int]]  # (job, attempt) affected when injected
    lifted_ms: int | None = None  # when the fault and its direct effect were over
    detected_ms: int | None = None
    resumed_ms: list[int] = field(default_factory=list)
    note: str = ""


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
    partition_s: float = 3.0
    redis_down_s: float = 1.0
    drain_s: float = 150.0  # after the load, how long to wait for every job to end
    sample_s: float = 1.0  # how often the ledger is sampled for stuck jobs
    log_dir: Path | None = None  # keep the fleet's logs here (default: a temporary dir)

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown or not self.faults:
            raise ConfigError(
                f"unknown fault kinds {sorted(unknown)}; choose from {', '.join(FAULT_KINDS)}"
            )


@dataclass
class _Watch:
    """A non-terminal job as the sampler last saw it."""

    workload: str
    ms: int  # the work its payload asks for
    key: tuple[str, int] | None = None  # (state, attempt)
    since_ms: int = 0


class Drill:
    def __init__(
        self,
        gq: GridQueue,
        fleet: LocalFleet,
        plan: DrillPlan,
        console: Console,
        server: EmbeddedRedis | None = None,
        proxy: TcpProxy | None = None,
        proxied: tuple[str, ...] = (),
    ):
        self.gq = gq
        self.fleet = fleet
        self.plan = plan
        self.console = console
        self.server = server
        self.proxy = proxy
        self.proxied = set(proxied)
        self.rng = random.Random(plan.seed)
        self.jobs: list[str] = []
        self.refused: int = 0
        self.submit_errors: int = 0
        self.injections: list[Injection] = []
        self.notes: list[str] = []
        self.exited: list[dict[str, Any]] = []  # fleet processes that exited on their own
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._undo: list[tuple[float, Callable[[], None]]] = []
        self._replacements = 0
        self._watchdogs = 0
        self._rogues = 0
        self._faults_tried = 0
        self._watch: dict[str, _Watch] = {}
        self._seen: dict[str, Seen] = {}
        self._stuck: dict[str, dict[str, Any]] = {}
        self._full_ms = 0  # last sample at which the fleet had no free slot
        self._samples = 0
        self._sample_errors = 0
        settings = gq.settings
        liveness_beat_s = max(
            (w.liveness_interval_s for w in gq.ledger.workloads.values()), default=0.0
        )
        # A new leader (or one back from a Redis outage) judges no one for this long.
        self._watchdog_grace_ms = int(
            (settings.stale_after_s + max(liveness_beat_s, settings.heartbeat_interval_s)) * 1000
        )
        self._slack_ms = int((plan.sample_s + 2 * settings.watchdog_tick_s) * 1000)

    # -- the run --------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        plan = self.plan
        started = time.monotonic()
        next_fault = started + min(5.0, plan.fault_interval_s)
        next_sample = started
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
                    self._inject(plan.faults[self._faults_tried % len(plan.faults)])
                    self._faults_tried += 1
                    next_fault += plan.fault_interval_s
                self._run_undo()
                if time.monotonic() >= next_sample:
                    self._tend()
                    next_sample = time.monotonic() + plan.sample_s
                progress.update(
                    task,
                    completed=elapsed,
                    description=f"jobs {len(self.jobs)}  faults {len(self.injections)}  "
                    f"stuck {len(self._stuck)}",
                )
                time.sleep(0.02)
        self._run_undo(force=True)
        for thread in self._threads:
            thread.join(timeout=60)
        for note in self.notes:
            self.console.print(f"[dim]{note}[/dim]")
        self.console.print(
            f"load done; draining: waiting up to {plan.drain_s:.0f} s for every job to end..."
        )
        self._drain(plan.drain_s)
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
            job_id = self.gq.submit(MODEL, payload, workload=workload).id
        except AdmissionError:
            self.refused += 1  # refused up front, with a reason: not accepted, not lost
            return
        except (RedisError, GridQueueError):
            self.submit_errors += 1  # submit() raised: not accepted, not lost
            return
        self.jobs.append(job_id)
        self._watch[job_id] = _Watch(workload, int(payload["ms"]))

    def _tend(self) -> None:
        """Once per sampling period: sample the ledger, replace quarantined nodes."""
        self._restart_exited()
        try:
            self._sample()
            self._recycle_quarantined()
        except RedisError:
            self._sample_errors += 1  # Redis restarting: the next sample catches up

    def _drain(self, drain_s: float) -> None:
        give_up_at = time.monotonic() + drain_s
        while self._watch and time.monotonic() < give_up_at:
            self._tend()
            if self._watch:
                time.sleep(self.plan.sample_s)

    # -- watching for stuck jobs --------------------------------------------------------

    def bound_ms(self, workload: str) -> int:
        """How long a job of ``workload`` may sit unchanged after the last fault."""
        settings = self.gq.settings
        cls = self.gq.ledger.workloads.get(workload)
        liveness_s = cls.liveness_timeout_s if cls else 5.0
        base_s = settings.stale_after_s + settings.dispatch_grace_s + liveness_s
        return int(base_s * 1000) + self._slack_ms

    def _last_fault_ms(self, now_ms: int) -> int:
        with self._lock:
            lifted = [now_ms if i.lifted_ms is None else i.lifted_ms for i in self.injections]
        return max(lifted, default=0)

    def _sample(self) -> None:
        ledger = self.gq.ledger
        now_ms = ledger.time_ms()
        self._samples += 1
        free = any(
            w.state is WorkerState.ALIVE
            and MODEL in w.models
            and len(w.running) < (w.concurrency or 0)
            for w in ledger.workers()
        )
        if not free:
            self._full_ms = now_ms  # a QUEUED job waits for capacity, not for a rescue
        last_fault_ms = self._last_fault_ms(now_ms)
        ids = list(self._watch)
        pipe = ledger.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(ledger.keys.job(job_id))
        rows = cast(list[dict[str, str]], pipe.execute())
        for job_id, data in zip(ids, rows, strict=True):
            if not data or "state" not in data:
                continue  # not in the ledger (a Redis that lost writes): the audit counts it
            record = JobRecord.from_hash(data)
            if record.terminal:
                self._seen[job_id] = Seen(record.state.value, record.result)
                del self._watch[job_id]
                continue
            watch = self._watch[job_id]
            key = (record.state.value, record.attempt)
            current = next((a for a in record.attempts if a.n == record.attempt), None)
            if watch.key != key:
                watch.key = key
                if record.state is JobState.RUNNING:
                    since = current.started_ms if current else None
                else:
                    since = current.queued_ms if current else None
                watch.since_ms = min(now_ms, since or now_ms)
            ref = max(watch.since_ms, last_fault_ms)
            if record.state is JobState.QUEUED:
                not_before = (current.not_before_ms if current else None) or 0
                ref = max(ref, not_before, self._full_ms)
            else:
                ref = max(watch.since_ms + watch.ms, last_fault_ms)
            bound = self.bound_ms(record.workload)
            if now_ms - ref > bound and job_id not in self._stuck:
                self._stuck[job_id] = {
                    "job": job_id,
                    "workload": record.workload,
                    "state": record.state.value,
                    "attempt": record.attempt,
                    "worker": record.worker,
                    "unchanged_ms": now_ms - watch.since_ms,
                    "since_last_fault_ms": now_ms - last_fault_ms,
                    "bound_ms": bound,
                    "message": self._where_is(f"{job_id}.{record.attempt}"),
                }

    def _where_is(self, member: str) -> list[str]:
        """Where the broker and the ledger hold attempt ``member`` now (for the report)."""
        ledger = self.gq.ledger
        client = ledger.client
        needle = f'"id": "{member}"'
        found: list[str] = []
        queue = queue_for_model(self.gq.settings.namespace, MODEL)
        for name in priority_lists(queue):
            bodies = cast(list[str], client.lrange(name, 0, -1))
            found += [f"queue {name}" for body in bodies if needle in body]
        unacked = cast(dict[str, str], client.hgetall(KOMBU_UNACKED))
        found += [f"unacked {tag}" for tag, body in unacked.items() if needle in body]
        due = client.zscore(ledger.keys.dispatch, member)
        if due is not None:
            found.append(f"dispatch due at {int(float(due))}")
        return found or ["nowhere"]

    # -- faults ---------------------------------------------------------------------

    def _own_workers(self) -> list[str]:
        return [p.name for p in self.fleet.processes.values() if p.kind == "worker" and p.alive()]

    def _busy_worker(self, among: list[str] | None = None) -> str | None:
        records = {w.name: w for w in self.gq.ledger.workers()}
        candidates = [
            (len(records[n].running), n)
            for n in (among if among is not None else self._own_workers())
            if n in records and records[n].state is WorkerState.ALIVE and records[n].running
        ]
        return max(candidates)[1] if candidates else None

    def _record(self, injection: Injection) -> None:
        with self._lock:
            self.injections.append(injection)

    def _lift(self, injection: Injection, action: Callable[[], None]) -> Callable[[], None]:
        """``action`` that ends the fault, then notes when it ended."""

        def lift() -> None:
            try:
                action()
            finally:
                with contextlib.suppress(RedisError):
                    injection.lifted_ms = self.gq.ledger.time_ms()

        return lift

    def _inject(self, kind: str) -> None:
        try:
            if kind == "taken":
                self._spawn(self._inject_taken)
            elif kind == "leader":
                self._inject_leader()
            elif kind == "redis":
                self._inject_redis()
            elif kind == "partition":
                self._inject_partition()
            else:
                self._inject_node(kind)
        except RedisError as exc:
            self.notes.append(f"{kind}: not injected, Redis error: {exc}")

    def _inject_node(self, kind: str) -> None:
        if kind == "gpu" and self.plan.targets:
            worker: str | None = self.rng.choice(self.plan.targets)
        else:
            # The worker behind the proxy is kept for partitions: a node fault would send
            # it to probation, and the next partition would find no ALIVE node to cut.
            spared = [n for n in self._own_workers() if n not in self.proxied]
            worker = self._busy_worker(spared or None)
        if worker is None:
            self.notes.append(f"{kind}: no busy worker to inject into; skipped")
            return
        record = self.gq.ledger.worker(worker)
        held = [split_attempt_id(m) for m in (record.running if record else [])]
        if kind in ("child", "stall"):
            if not held:
                self.notes.append(f"{kind}: {worker} runs nothing now; skipped")
                return
            held = [self.rng.choice(held)]
        now_ms = self.gq.ledger.time_ms()
        injection = Injection(kind, worker, now_ms, held)
        proc = self.fleet.processes.get(worker)
        if kind == "kill9" and proc:
            proc.signal_group(signal.SIGKILL)
            injection.lifted_ms = now_ms
            self._later(0.0, lambda: self._replace(worker))
        elif kind == "zombie" and proc:
            proc.signal_group(signal.SIGSTOP)
            resume = self._lift(injection, lambda: proc.signal_group(signal.SIGCONT))
            self._later(self.plan.zombie_s, resume)
        elif kind in ("child", "stall"):
            pid = self.gq.get(held[0][0]).attempts[held[0][1] - 1].pid
            if not pid:
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL if kind == "child" else signal.SIGSTOP)
            injection.lifted_ms = now_ms
        elif kind == "gpu":
            inject_fault(self.gq.settings, worker, 0, Fault(xid=(79,)))
            clear = self._lift(injection, lambda: clear_faults(self.gq.settings, worker))
            self._later(self.plan.gpu_fault_s, clear)
        else:
            return
        self._record(injection)

    def _inject_taken(self) -> None:
        """A consumer like a worker's takes one message and is SIGKILLed before it claims."""
        self._rogues += 1
        name = f"drill-taker-{self._rogues}"
        queue = queue_for_model(self.gq.settings.namespace, MODEL)
        log_path = self.fleet.log_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            rogue = subprocess.Popen(
                [sys.executable, "-m", "gridqueue.faults", "take", self.fleet.redis_url, queue,
                 "15"],
                env=self.fleet.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=log_file, start_new_session=True,
            )  # fmt: skip
        try:
            assert rogue.stdout is not None
            line = rogue.stdout.readline()
            at_ms = self.gq.ledger.time_ms()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(rogue.pid, signal.SIGKILL)
            rogue.wait(timeout=30)
        taken = json.loads(line or b"{}")
        if not taken.get("task_id"):
            self.notes.append(f"taken: {name} got no message within 15 s; nothing injected")
            return
        job_id, attempt = split_attempt_id(taken["task_id"])
        held = bool(self.gq.ledger.client.hexists(KOMBU_UNACKED, taken["delivery_tag"]))
        note = (
            f"taken: {name} took {taken['task_id']} and was SIGKILLed before claiming it; "
            f"the message {'sits' if held else 'does NOT sit'} in kombu's {KOMBU_UNACKED!r} "
            f"hash (delivery tag {taken['delivery_tag']})"
        )
        self.notes.append(note)
        self._record(Injection("taken", name, at_ms, [(job_id, attempt)], at_ms, note=note))

    def _inject_leader(self) -> None:
        ledger = self.gq.ledger
        value = cast(str | None, ledger.client.get(ledger.keys.leader))
        if not value:
            self.notes.append("leader: no watchdog leads now; skipped")
            return
        owner_pid = value.split(":")[1] if value.count(":") >= 2 else ""
        leader = next(
            (
                p
                for p in self.fleet.processes.values()
                if p.kind == "watchdog" and str(p.pid) == owner_pid and p.alive()
            ),
            None,
        )
        if leader is None:
            self.notes.append(f"leader: the leader {value!r} is not a watchdog of this drill")
            return
        at_ms = ledger.time_ms()
        leader.signal_group(signal.SIGKILL)
        self.fleet.processes.pop(leader.name, None)
        # Its lease runs out, then the standby takes over and waits out its grace.
        lifted = at_ms + int(self.gq.settings.watchdog_lease_s * 1000) + self._watchdog_grace_ms
        note = f"leader: killed {leader.name} ({value})"
        self.notes.append(note)
        self._record(Injection("leader", leader.name, at_ms, [], lifted, note=note))
        self._watchdogs += 1
        self.fleet.start_watchdog(f"drill-watchdog-r{self._watchdogs}")  # the new standby

    def _inject_redis(self) -> None:
        if self.server is None:
            return
        ledger = self.gq.ledger
        held = [split_attempt_id(m) for m in ledger.running_attempts()]
        at_ms = ledger.time_ms()
        injection = Injection("redis", "redis-server", at_ms, held)
        self._record(injection)
        self.server.kill()
        time.sleep(self.plan.redis_down_s)
        self.server.start(timeout_s=60)
        back_ms = retryable_time_ms(self.gq)
        injection.detected_ms = back_ms  # serving again
        injection.lifted_ms = back_ms + self._watchdog_grace_ms
        injection.note = f"redis: down {back_ms - at_ms} ms (kill -9, restart from the AOF)"
        self.notes.append(injection.note)

    def _inject_partition(self) -> None:
        if self.proxy is None:
            return
        records = {w.name: w for w in self.gq.ledger.workers()}
        cut = [
            n
            for n in self._own_workers()
            if n in self.proxied and n in records and records[n].state is WorkerState.ALIVE
        ]
        worker = self._busy_worker(cut) or (cut[0] if cut else None)
        if worker is None or self.proxy.partitioned:
            self.notes.append("partition: no ALIVE worker behind the proxy; skipped")
            return
        held = [split_attempt_id(m) for m in records[worker].running]
        injection = Injection("partition", worker, self.gq.ledger.time_ms(), held)
        self.proxy.partition()
        self._later(self.plan.partition_s, self._lift(injection, self.proxy.heal))
        self._record(injection)

    def _spawn(self, target: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception as exc:  # a fault that could not be injected: say so
                self.notes.append(f"fault not injected: {exc!r}")

        thread = threading.Thread(target=guarded, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _restart_exited(self) -> None:
        """Play the orchestrator for processes of the fleet that exited on their own (the
        drill's own kills are replaced where they are made): restart them, and say so."""
        for proc in list(self.fleet.processes.values()):
            code = proc.process.poll()
            if code is None:
                continue
            log = proc.log_path.read_text(errors="replace").splitlines()
            why = next((line for line in log if "Unrecoverable error" in line), "")
            why = why or next((line for line in reversed(log) if line.strip()), "")
            self.exited.append({"name": proc.name, "kind": proc.kind, "exit_code": code})
            self.notes.append(f"{proc.kind} {proc.name} exited on its own ({code}): {why[:300]}")
            if proc.kind == "worker":
                self._replace(proc.name)
            else:
                self.fleet.processes.pop(proc.name, None)
                self._watchdogs += 1
                self.fleet.start_watchdog(f"drill-watchdog-r{self._watchdogs}")

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
        name = f"drill-r{self._replacements}"
        env = None
        if dead in self.proxied and self.proxy is not None:
            self.proxied.discard(dead)
            self.proxied.add(name)
            env = {"GRIDQUEUE_REDIS_URL": self.proxy.proxied(self.fleet.redis_url)}
        self.fleet.start_worker(name, concurrency=self.plan.concurrency, env=env)

    def _later(self, delay_s: float, action: Callable[[], None]) -> None:
        self._undo.append((time.monotonic() + delay_s, action))

    def _run_undo(self, force: bool = False) -> None:
        now = time.monotonic()
        due = [(t, a) for t, a in self._undo if force or t <= now]
        self._undo = [(t, a) for t, a in self._undo if not (force or t <= now)]
        for _, action in due:
            with contextlib.suppress(Exception):
                action()

    # -- the report -----------------------------------------------------------------

    def _measure(self, records: dict[str, JobRecord]) -> None:
        events = self.gq.ledger.events(count=10_000_000)
        for event in events:
            stuck = self._stuck.get(event.get("job", ""))
            if stuck is not None:
                trail = stuck.setdefault("events", [])
                trail.append(
                    f"{event['ts']} {event['type']} a{event.get('attempt', '?')} "
                    f"{event.get('worker', '')}".rstrip()
                )
        for inj in self.injections:
            if inj.kind in ("kill9", "zombie", "partition"):
                inj.detected_ms = _first(events, "worker_dead", inj.at_ms, worker=inj.worker)
            elif inj.kind == "gpu":
                inj.detected_ms = _first(events, "worker_quarantined", inj.at_ms, worker=inj.worker)
            elif inj.kind == "leader":
                inj.detected_ms = _first(events, "leader_elected", inj.at_ms)
            elif inj.kind == "taken":
                job_id = inj.attempts[0][0]
                inj.detected_ms = _first_acting(events, job_id, inj.at_ms)
            for job_id, n in inj.attempts:
                record = records.get(job_id)
                if record is None or len(record.attempts) < n:
                    continue
                ended = record.attempts[n - 1]
                if inj.kind in ("child", "stall") and inj.detected_ms is None and ended.ended_ms:
                    inj.detected_ms = ended.ended_ms
                if inj.kind == "taken" and ended.started_ms and ended.started_ms >= inj.at_ms:
                    # Never claimed by the dead taker: claimed later, after a redelivery.
                    inj.resumed_ms.append(ended.started_ms - inj.at_ms)
                    continue
                following = record.attempts[n] if len(record.attempts) > n else None
                if following is not None and following.started_ms is not None:
                    inj.resumed_ms.append(following.started_ms - inj.at_ms)

    def _report(self, wall_s: float) -> dict[str, Any]:
        records: dict[str, JobRecord] = {}
        for job_id in self.jobs:
            with contextlib.suppress(GridQueueError):
                records[job_id] = self.gq.get(job_id)
        self._measure(records)
        result = audit(self.gq.ledger, self.jobs, self._seen)
        for job_id, record in records.items():
            if record.state is JobState.EXPIRED and job_id not in self._stuck:
                by_deadline = record.reason == "deadline" and (
                    record.deadline_ms is not None
                    and record.ended_ms is not None
                    and record.ended_ms >= record.deadline_ms
                )
                if not by_deadline:
                    self._stuck[job_id] = {
                        "job": job_id,
                        "workload": record.workload,
                        "state": "EXPIRED",
                        "attempt": record.attempt,
                        "worker": record.worker,
                        "why": "expired, but not by its deadline",
                    }
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
                "jobs_affected": sum(len(i.attempts) for i in items),
                "jobs_moved": len(resume),
            }
        stats = self.gq.ledger.stats()
        first = stats.get("first_placements", 0)
        bad = stats.get("bad_first_placements", 0)
        counted = result.to_dict()
        stuck = sorted(self._stuck.values(), key=lambda s: str(s["job"]))
        failures = [
            f"{name}: {value}"
            for name, value in (
                ("lost", counted["lost"]),
                ("duplicate visible results", counted["duplicates"]),
                ("exclusive jobs run more than once", counted["exclusive_runs_over_one"]),
                ("stuck", len(stuck)),
                ("succeeded without a counted run", counted["succeeded_without_counted_run"]),
            )
            if value
        ]
        return {
            "wall_s": round(wall_s, 1),
            "plan": {
                "duration_s": self.plan.duration_s,
                "rate_per_s": self.plan.rate_per_s,
                "workers": self.plan.workers,
                "faults": list(self.plan.faults),
                "drain_s": self.plan.drain_s,
            },
            **counted,
            "stuck": len(stuck),
            "stuck_jobs": stuck[:20],
            "stuck_bound_ms": {n: self.bound_ms(n) for n in sorted(self.gq.ledger.workloads)},
            "refused_at_submit": self.refused,
            "submit_errors": self.submit_errors,
            "dead_lettered": result.by_state.get("DEAD_LETTERED", 0),
            "faults_injected": len(self.injections),
            "per_fault": per_kind,
            "exited_on_their_own": self.exited,
            "notes": self.notes,
            "ledger_samples": self._samples,
            "bad_first_placement_rate": bad / first if first else 0.0,
            "counters": stats,
            "passed": not failures,
            "failures": failures,
        }


def retryable_time_ms(gq: GridQueue, timeout_s: float = 30.0) -> int:
    """Redis server time, once Redis answers again."""
    give_up_at = time.monotonic() + timeout_s
    while True:
        try:
            return gq.ledger.time_ms()
        except RedisError:
            if time.monotonic() > give_up_at:
                raise
            time.sleep(0.05)


def _first(
    events: list[dict[str, str]], kind: str, after_ms: int, worker: str | None = None
) -> int | None:
    for event in events:
        if (
            event["type"] == kind
            and (worker is None or event.get("worker") == worker)
            and int(event["ts"]) >= after_ms
        ):
            return int(event["ts"])
    return None


def _first_acting(events: list[dict[str, str]], job_id: str, after_ms: int) -> int | None:
    """The first transition of ``job_id`` after ``after_ms`` other than its deadline:
    the system acted on it again."""
    for event in events:
        if event.get("job") != job_id or int(event["ts"]) < after_ms:
            continue
        if event["type"] == "ended" and event.get("reason") == "deadline":
            return None
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
    faults = list(plan.faults)
    if redis_url is not None and "redis" in faults:
        faults.remove("redis")
        console.print("[yellow]redis fault skipped: the drill restarts only its own Redis[/]")
    if not start_watchdog and "leader" in faults:
        faults.remove("leader")
        console.print("[yellow]leader fault skipped: the drill kills only its own watchdogs[/]")
    if not faults:
        raise ConfigError("no fault kind of this plan can run here; see `gridqueue drill --help`")
    plan.faults = tuple(faults)
    settings = Settings(redis_url=redis_url or "redis://127.0.0.1:6379/0")
    if "partition" in faults and plan.partition_s <= settings.stale_after_s:
        raise ConfigError(
            f"a partition of {plan.partition_s} s is not longer than stale_after_s "
            f"({settings.stale_after_s} s): the worker would never be declared dead"
        )
    with contextlib.ExitStack() as stack:
        server: EmbeddedRedis | None = None
        if redis_url is None:
            # Durable as production would run it: AOF, fsync every second.
            server = EmbeddedRedis(appendonly=True, appendfsync="everysec")
            stack.callback(server.cleanup)
            redis_url = server.start()
        if plan.log_dir is not None:
            log_dir = plan.log_dir
        else:
            log_dir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="gridqueue-drill-"))
            )
        fleet = LocalFleet(redis_url, log_dir)
        stack.callback(fleet.stop_all)
        gq = GridQueue(settings=settings.model_copy(update={"redis_url": redis_url}))
        stack.callback(gq.close)
        proxy: TcpProxy | None = None
        names = [f"drill-w{i + 1}" for i in range(plan.workers)]
        proxied: tuple[str, ...] = ()
        if "partition" in faults:
            proxy = TcpProxy.for_url(redis_url)
            stack.callback(proxy.close)
            proxied = (names[-1],)
        for name in names:
            env = None
            if proxy is not None and name in proxied:
                env = {"GRIDQUEUE_REDIS_URL": proxy.proxied(redis_url)}
            fleet.start_worker(name, concurrency=plan.concurrency, env=env)
        if start_watchdog:
            fleet.start_watchdog("drill-watchdog-a")
            fleet.start_watchdog("drill-watchdog-b")
        fleet.wait_alive(gq.ledger, names)
        console.print(
            f"fleet: {plan.workers} workers x {plan.concurrency} slots on {redis_url}"
            + (f" ({', '.join(proxied)} through a cuttable proxy)" if proxied else "")
        )
        drill = Drill(gq, fleet, plan, console, server=server, proxy=proxy, proxied=proxied)
        return drill.run()


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
        ("refused at submit", report["refused_at_submit"] + report["submit_errors"]),
        ("lost", report["lost"]),
        ("  of which gone from the ledger", report["missing_from_ledger"]),
        ("duplicate visible results", report["duplicates"]),
        ("exclusive jobs run more than once", report["exclusive_runs_over_one"]),
        ("stuck", report["stuck"]),
        ("handler runs started / returned", f"{report['handler_runs']} / "
         f"{report['handler_returns']}"),
        ("stale results discarded", report["stale_results_discarded"]),
        ("faults injected", report["faults_injected"]),
        ("processes that exited on their own", len(report["exited_on_their_own"])),
        ("bad first placements", f"{report['bad_first_placement_rate']:.1%}"),
        ("wall time", f"{report['wall_s']} s"),
    ):  # fmt: skip
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
            _ms(r["p50"]), _ms(r["p99"]), _ms(r["max"]),
            f"{row['jobs_moved']}/{row['jobs_affected']}",
        )  # fmt: skip
    console.print(faults)
    for stuck in report["stuck_jobs"][:10]:
        console.print(f"[red]stuck[/red] {json.dumps(stuck)}")
    if report["passed"]:
        console.print(
            "[green]contract held: 0 lost, 0 duplicates, 0 exclusive runs > 1, 0 stuck[/green]"
        )
    else:
        console.print(f"[red]CONTRACT BROKEN[/red]: {'; '.join(report['failures'])}")


def _ms(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.0f}"
