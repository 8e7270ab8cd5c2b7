"""Read-only views of the fleet, as the dashboard, the JSON API and /metrics show them.

Every method returns plain JSON-ready data (dicts, lists, str, int, float, bool, None).
Times are Redis server time in ms (``*_ms``); durations are ms too (``*_age_ms`` and the
incident durations). Reads are bounded: pages, caps and pipelines, never a scan of every
job or every key, so a page answers quickly with 1,000 workers and 100,000 jobs in the
ledger. Nothing here writes but the stats fold, which a reader runs first so that the
counters it shows are exact (see ``Ledger.fold_stats``); actions go through the ledger's verbs.

Shapes:

- ``overview()``: ``now_ms``, ``workers`` (count by state), ``jobs`` (count by state),
  ``running_attempts``, ``queues`` (per model: ``depth`` and ``by_priority``), ``rates``
  (per-minute counters for the last ``window_s``, and requeues, failures and successes
  per minute over it), ``stats`` (every counter), ``watchdog`` (``leader``).
- ``workers()``: a WorkerSummary per worker, live ones first: ``name``, ``state``,
  ``verdict``, ``reasons``, ``notices`` (monitoring gaps, e.g. ``no_xid_events:gpu0``: not
  a fault), ``probe``, ``models``, ``host``, ``pid``, ``epoch``,
  ``heartbeat_age_ms``, ``running`` (attempt ids), ``concurrency``, ``gpus`` (as the
  probe reported them: ``index``, ``name``, ``uuid``, ``memory_used_bytes``,
  ``memory_total_bytes``, ``utilization_ratio``, ``temperature_c``, ``power_w``,
  ``xid_counts`` {code: count}, ...), ``quarantined_by``, ``quarantine_reason``,
  ``quarantine_mode``, ``quarantined_ms``, ``probation_until_ms``, ``failures``,
  ``declared_dead_ms``, ``gone_ms``.
- ``worker(name)``: a WorkerSummary plus ``history`` (its events, newest first).
- ``jobs(state, model, workload, worker, limit, cursor)``: ``jobs`` (JobSummary: ``id``,
  ``model``, ``workload``, ``state``, ``attempt``, ``worker``, ``created_ms``,
  ``updated_ms``, ``ended_ms``, ``reason``, ``error``), newest first; ``next_cursor``;
  ``scanned`` (records read); ``complete`` (False when the scan cap stopped a filtered
  search before the end: ask again with ``next_cursor``).
- ``job(id)``: the record (``JobRecord.to_dict()``) plus ``timeline``: one row per
  attempt (``n``, ``worker``, ``pid``, ``queued_ms``, ``claimed_ms``, ``ended_ms``,
  ``outcome``, ``error``, ``last_progress_ms``, ``fault_ms``).
- ``failovers(limit)``: Incidents, newest first: ``id``, ``kind`` (worker_dead,
  gpu_quarantine, gpu_drain, stall, stall_quarantine, operator_quarantine), ``worker``,
  ``reason``, ``sign_ms`` (the fault's last sign of life), ``verdict_ms``, ``detect_ms``
  (verdict - sign), ``attempts`` (per moved attempt: ``attempt``, ``job``, ``outcome``,
  ``requeued_ms``, ``next_attempt``, ``running_again_ms``, ``state``), ``jobs_moved``,
  ``requeue_ms`` (verdict -> last requeue), ``running_again_ms`` (sign -> the last moved
  job running again), ``pending`` (moved attempts with no successor running yet).
- ``dead_letters(reason, model, limit)``: ``groups`` by reason (``reason``, ``count``,
  ``jobs``: JobSummary plus ``evidence``: the attempts that led there), ``total``.
- ``health()``: ``redis`` (reachable), ``now_ms``.
"""

from __future__ import annotations

import json
from typing import Any, cast

from gridqueue.celeryapp import PRIORITY_STEPS, priority_lists
from gridqueue.errors import JobNotFoundError, WorkerNotFoundError
from gridqueue.keys import queue_for_model, split_attempt_id
from gridqueue.ledger import Ledger
from gridqueue.records import AttemptRecord, JobRecord
from gridqueue.states import TERMINAL_STATES, JobState, WorkerState

# Fields of a job record a list needs (never the payload or the result).
_SUMMARY_FIELDS = (
    "id",
    "model",
    "workload",
    "state",
    "attempt",
    "worker",
    "created_ms",
    "updated_ms",
    "ended_ms",
    "reason",
    "error",
)
# A moved attempt as a failover row follows it: the job's state, the attempt, its successor.
_Moved = tuple[str, AttemptRecord | None, AttemptRecord | None]
# A filtered job search reads at most this many records per call, then hands back a cursor.
SCAN_CAP = 2_000
MAX_LIMIT = 500
RATE_WINDOW_MIN = 15
# Outcomes counted as failures in the overview's rates.
_FAILURE_OUTCOMES = ("error", "invalid_input", "worker_lost", "node_lost", "stalled", "gpu_fault")


def _int(value: Any) -> int | None:
    return int(value) if value not in (None, "") else None


def _decode(raw: str | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


class FleetView:
    """The fleet as the ledger knows it, read in bounded, pipelined round trips."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.client = ledger.client
        self.keys = ledger.keys
        self.namespace = ledger.settings.namespace

    # -- overview ------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        now = self.ledger.time_ms()
        models = self.models()
        self.ledger.fold_stats()  # the counters as of now, not as of the watchdog's last fold
        pipe = self.client.pipeline(transaction=False)
        for state in JobState:
            pipe.zcard(self.keys.jobs_in_state(state.value))
        pipe.hgetall(self.keys.stats)
        pipe.get(self.keys.leader)
        for model in models:
            for name in priority_lists(queue_for_model(self.namespace, model)):
                pipe.llen(name)
        minute_now = now // 60_000
        minutes = list(range(minute_now - RATE_WINDOW_MIN + 1, minute_now + 1))
        for m in minutes:
            pipe.hgetall(self.keys.minute(m))
        replies = pipe.execute()
        counts = dict(zip((s.value for s in JobState), replies[: len(JobState)], strict=True))
        stats, leader = replies[len(JobState) : len(JobState) + 2]
        # A running job runs one attempt, its current one: so many attempts run.
        running = counts[JobState.RUNNING.value]
        rest = replies[len(JobState) + 2 :]
        queues = []
        per_model = len(PRIORITY_STEPS)
        for i, model in enumerate(models):
            lengths = [int(n) for n in rest[i * per_model : (i + 1) * per_model]]
            queues.append(
                {
                    "model": model,
                    "queue": queue_for_model(self.namespace, model),
                    "depth": sum(lengths),
                    "by_priority": {
                        str(step): n for step, n in zip(PRIORITY_STEPS, lengths, strict=True)
                    },
                }
            )
        per_minute = []
        for m, raw in zip(minutes, rest[len(models) * per_model :], strict=True):
            row = {k: int(v) for k, v in cast(dict[str, str], raw).items()}
            per_minute.append(
                {
                    "minute_ms": m * 60_000,
                    "requeues": row.get("requeues", 0),
                    "failures": sum(row.get(f"attempts_ended:{o}", 0) for o in _FAILURE_OUTCOMES),
                    "succeeded": row.get("attempts_ended:succeeded", 0),
                    "claims": row.get("claims", 0),
                    "workers_declared_dead": row.get("workers_declared_dead", 0),
                    "quarantines": sum(v for k, v in row.items() if k.startswith("quarantines:")),
                    "dead_lettered": row.get("dead_lettered", 0),
                }
            )

        def per_min(field: str) -> float:
            return round(sum(int(r[field]) for r in per_minute) / RATE_WINDOW_MIN, 3)

        workers = {state.value: 0 for state in WorkerState}
        for worker in self._worker_states():
            workers[worker] = workers.get(worker, 0) + 1
        return {
            "now_ms": now,
            "workers": workers,
            "jobs": {state: int(n) for state, n in counts.items()},
            "running_attempts": int(running),
            "queues": queues,
            "rates": {
                "window_s": RATE_WINDOW_MIN * 60,
                "per_minute": per_minute,
                "requeues_per_min": per_min("requeues"),
                "failures_per_min": per_min("failures"),
                "succeeded_per_min": per_min("succeeded"),
            },
            "stats": {k: int(v) for k, v in sorted(cast(dict[str, str], stats).items())},
            "watchdog": {"leader": str(leader).rsplit(":", 1)[0] if leader else None},
        }

    def models(self) -> list[str]:
        return sorted(cast(set[str], self.client.smembers(self.keys.models)))

    def _names(self) -> tuple[list[str], dict[str, int], dict[str, int]]:
        """Every worker's name, when each that left the fleet left it, and the last beat of
        each still in it (its score there)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrange(self.keys.workers, 0, -1, withscores=True)
        pipe.zrange(self.keys.gone, 0, -1, withscores=True)
        live, gone = pipe.execute()
        gone_ms = {name: int(score) for name, score in gone}
        beat_ms = {name: int(score) for name, score in live}
        return sorted(set(beat_ms) | set(gone_ms)), gone_ms, beat_ms

    def _worker_states(self) -> list[str]:
        names, _, _ = self._names()
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hget(self.keys.worker(name), "state")
        return [state for state in pipe.execute() if state]

    # -- workers ---------------------------------------------------------------------

    def workers(self, gone_within_s: float | None = None) -> list[dict[str, Any]]:
        """Every registered worker; with ``gone_within_s``, only those still in the fleet
        or gone (dead, stopped) less than that long ago."""
        names, gone_ms, beat_ms = self._names()
        now = self.ledger.time_ms()
        if gone_within_s is not None:
            horizon = now - gone_within_s * 1000
            names = [n for n in names if n not in gone_ms or gone_ms[n] >= horizon]
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.worker(name))
            pipe.smembers(self.keys.worker_running(name))
        replies = pipe.execute()
        rows = []
        for i, name in enumerate(names):
            data, running = replies[2 * i], replies[2 * i + 1]
            if data and "state" in data:
                rows.append(
                    self._worker_summary(data, running, now, gone_ms.get(name), beat_ms.get(name))
                )
        order = {s.value: i for i, s in enumerate(WorkerState)}
        rows.sort(key=lambda r: (order.get(r["state"], 99), r["name"]))
        return rows

    def worker(self, name: str, history: int = 100) -> dict[str, Any]:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.worker(name))
        pipe.smembers(self.keys.worker_running(name))
        pipe.zscore(self.keys.gone, name)
        pipe.lrange(self.keys.worker_history(name), 0, max(history, 1) - 1)
        pipe.zscore(self.keys.workers, name)
        data, running, gone, events, beat = pipe.execute()
        if not data or "state" not in data:
            raise WorkerNotFoundError(f"no worker {name!r} is registered")
        summary = self._worker_summary(
            data,
            running,
            self.ledger.time_ms(),
            int(gone) if gone else None,
            int(beat) if beat is not None else None,
        )
        summary["history"] = [e for e in (_decode(raw) for raw in events) if e]
        return summary

    @staticmethod
    def _worker_summary(
        data: dict[str, str],
        running: set[str],
        now: int,
        gone_ms: int | None,
        beat_ms: int | None,
    ) -> dict[str, Any]:
        health = _decode(data.get("health")) or {}
        # A worker in the fleet has its last beat as its score there; one that left it,
        # in its record.
        last = beat_ms if beat_ms is not None else _int(data.get("last_heartbeat_ms"))
        return {
            "name": data.get("name", ""),
            "state": data["state"],
            "verdict": data.get("verdict") or None,
            "reasons": list(health.get("reasons") or []),
            "notices": list(health.get("notices") or []),
            "probe": data.get("probe") or None,
            "models": [m for m in data.get("models", "").split(",") if m],
            "unfit_models": [m for m in data.get("unfit_models", "").split(",") if m],
            "host": data.get("host"),
            "pid": _int(data.get("pid")),
            "epoch": _int(data.get("epoch")),
            "concurrency": _int(data.get("concurrency")),
            "registered_ms": _int(data.get("registered_ms")),
            "heartbeat_age_ms": None if last is None else max(0, now - last),
            "last_heartbeat_ms": last,
            "running": sorted(running),
            "gpus": list(health.get("gpus") or _decode(data.get("gpus")) or []),
            "quarantined_by": data.get("quarantined_by") or None,
            "quarantine_reason": data.get("quarantine_reason") or None,
            "quarantine_mode": data.get("quarantine_mode") or None,
            "quarantined_ms": _int(data.get("quarantined_ms")),
            "probation_until_ms": _int(data.get("probation_until_ms")),
            "failures": int(data.get("failures") or 0),
            "declared_dead_ms": _int(data.get("declared_dead_ms")),
            "gone_ms": gone_ms,
        }

    # -- jobs ------------------------------------------------------------------------

    def jobs(
        self,
        state: str | None = None,
        model: str | None = None,
        workload: str | None = None,
        worker: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """A page of jobs, newest first: by when they entered their state, or with
        ``worker``, by when that worker last claimed them (its recent jobs are listed).

        Without a state, the lists of every state are merged. Filters read at most
        ``SCAN_CAP`` records per call; ``complete`` says whether the search reached the
        end. ``cursor`` is the ``next_cursor`` of the page before.
        """
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, not {limit}")
        wanted = self._state(state) if state else None
        if worker:
            lists = [self.keys.worker_jobs(worker)]
        else:
            states = [wanted] if wanted else [s.value for s in JobState]
            lists = [self.keys.jobs_in_state(s) for s in states]
        before, after_id = self._cursor(cursor)
        filtered = any((model, workload, worker))
        page: list[dict[str, Any]] = []
        scanned = 0
        chunk = limit if not filtered else min(SCAN_CAP, 4 * limit)
        while True:
            batch = self._newest(lists, before, after_id, chunk)
            if not batch:
                return {"jobs": page, "next_cursor": None, "scanned": scanned, "complete": True}
            records = self._summaries([job_id for job_id, _ in batch])
            for (job_id, score), record in zip(batch, records, strict=True):
                scanned += 1
                before, after_id = score, job_id
                if record is None or (worker and wanted and record["state"] != wanted):
                    continue
                if (model and record["model"] != model) or (
                    workload and record["workload"] != workload
                ):
                    continue
                page.append(record)
                if len(page) == limit:
                    return {
                        "jobs": page,
                        "next_cursor": f"{score}:{job_id}",
                        "scanned": scanned,
                        "complete": True,
                    }
            if scanned >= SCAN_CAP:
                return {
                    "jobs": page,
                    "next_cursor": f"{before}:{after_id}",
                    "scanned": scanned,
                    "complete": False,
                }

    @staticmethod
    def _state(state: str) -> str:
        try:
            return JobState(state.upper()).value
        except ValueError:
            known = ", ".join(s.value for s in JobState)
            raise ValueError(f"unknown job state {state!r}: use one of {known}") from None

    @staticmethod
    def _cursor(cursor: str | None) -> tuple[int | None, str | None]:
        if not cursor:
            return None, None
        score, sep, job_id = cursor.partition(":")
        if not sep or not (score.isascii() and score.isdigit()) or not job_id:
            raise ValueError(f"malformed cursor {cursor!r}: pass next_cursor from the last page")
        return int(score), job_id

    def _newest(
        self, lists: list[str], before: int | None, after_id: str | None, count: int
    ) -> list[tuple[str, int]]:
        """The next ``count`` jobs across the lists, newest first, strictly after the
        cursor (``before``, ``after_id``): ties on the score are broken by id."""
        pipe = self.client.pipeline(transaction=False)
        top = "+inf" if before is None else f"({before}"
        for key in lists:
            if before is not None:
                pipe.zrangebyscore(key, before, before, withscores=True)  # ties at the cursor
            pipe.zrevrangebyscore(key, top, "-inf", start=0, num=count, withscores=True)
        merged: list[tuple[str, int]] = []
        for rows in pipe.execute():
            for job_id, score in rows:
                if before is not None and int(score) == before and job_id >= (after_id or ""):
                    continue  # at or before the cursor: on an earlier page
                merged.append((job_id, int(score)))
        merged.sort(key=lambda row: (row[1], row[0]), reverse=True)
        return merged[:count]

    def _summaries(self, job_ids: list[str]) -> list[dict[str, Any] | None]:
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), *_SUMMARY_FIELDS)
        rows: list[dict[str, Any] | None] = []
        for values in pipe.execute():
            data = dict(zip(_SUMMARY_FIELDS, values, strict=True))
            if not data["state"]:
                rows.append(None)  # expired between the list and the read
                continue
            rows.append(
                {
                    "id": data["id"],
                    "model": data["model"],
                    "workload": data["workload"],
                    "state": data["state"],
                    "attempt": _int(data["attempt"]),
                    "worker": data["worker"] or None,
                    "created_ms": _int(data["created_ms"]),
                    "updated_ms": _int(data["updated_ms"]),
                    "ended_ms": _int(data["ended_ms"]),
                    "reason": data["reason"] or None,
                    "error": data["error"] or None,
                }
            )
        return rows

    def job(self, job_id: str) -> dict[str, Any]:
        record = self.ledger.get(job_id)
        data = record.to_dict()
        data["updated_ms"] = _int(self.client.hget(self.keys.job(job_id), "updated_ms"))
        data["progress_ms"] = record.progress_ms
        data["timeline"] = [self._attempt_row(record, a) for a in record.attempts]
        return data

    @staticmethod
    def _attempt_row(record: JobRecord, a: AttemptRecord) -> dict[str, Any]:
        current = a.n == record.attempt and a.ended_ms is None
        return {
            "n": a.n,
            "worker": a.worker,
            "pid": a.pid,
            "queued_ms": a.queued_ms,
            "not_before_ms": a.not_before_ms,
            "claimed_ms": a.started_ms,
            "ended_ms": a.ended_ms,
            "outcome": a.outcome,
            "error": a.error,
            "last_progress_ms": record.progress_ms if current else None,
            "fault_ms": a.fault_ms,
            "replay": a.replay,
            "late_result_discarded": a.late_result_discarded,
        }

    # -- failovers -------------------------------------------------------------------

    def failovers(self, limit: int = 50) -> list[dict[str, Any]]:
        """Failover incidents, newest first, each followed through the jobs it moved."""
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, not {limit}")
        entries = cast(
            list[tuple[str, dict[str, str]]],
            self.client.xrevrange(self.keys.incidents, count=limit),
        )
        members = sorted(
            {m for _, fields in entries for m in (fields.get("attempts") or "").split(",") if m}
        )
        # Only what a row shows: the job's state, the moved attempt and its successor (a
        # record's payload and result can be large).
        pipe = self.client.pipeline(transaction=False)
        for member in members:
            job_id, n = split_attempt_id(member)
            pipe.hmget(self.keys.job(job_id), "state", f"a:{n}", f"a:{n + 1}")
        followed: dict[str, _Moved] = {}
        for member, (state, lost, successor) in zip(members, pipe.execute(), strict=True):
            if state:
                followed[member] = (
                    state,
                    AttemptRecord.from_json(lost) if lost else None,
                    AttemptRecord.from_json(successor) if successor else None,
                )
        return [self._incident(entry_id, fields, followed) for entry_id, fields in entries]

    @staticmethod
    def _incident(
        entry_id: str, fields: dict[str, str], followed: dict[str, _Moved]
    ) -> dict[str, Any]:
        sign = int(fields.get("sign_ms") or 0)
        verdict = int(fields.get("verdict_ms") or 0)
        rows = []
        for member in (m for m in (fields.get("attempts") or "").split(",") if m):
            job_id, n = split_attempt_id(member)
            state, lost, successor = followed.get(member, (None, None, None))
            row: dict[str, Any] = {
                "attempt": member,
                "job": job_id,
                "n": n,
                "outcome": None,
                "requeued_ms": None,
                "next_attempt": None,
                "running_again_ms": None,
                "state": state,
            }
            if state is not None:
                if lost is not None:
                    row["outcome"] = lost.outcome
                    row["requeued_ms"] = lost.ended_ms
                if successor is not None and not successor.replay:
                    row["next_attempt"] = n + 1
                    row["running_again_ms"] = successor.started_ms
            rows.append(row)
        requeues = [r["requeued_ms"] for r in rows if r["requeued_ms"]]
        running = [r["running_again_ms"] for r in rows if r["running_again_ms"]]
        # A moved attempt is settled once its successor runs or its job has ended.
        pending = sum(
            1 for r in rows if not r["running_again_ms"] and r["state"] not in TERMINAL_STATES
        )
        return {
            "id": entry_id,
            "kind": fields.get("kind", ""),
            "worker": fields.get("worker", ""),
            "reason": fields.get("reason", ""),
            "sign_ms": sign,
            "verdict_ms": verdict,
            "detect_ms": verdict - sign,
            "attempts": rows,
            "jobs_moved": int(fields.get("moved") or len(rows)),
            "requeue_ms": max(requeues) - verdict if requeues else None,
            "running_again_ms": max(running) - sign if running and not pending else None,
            "pending": pending,
        }

    # -- dead letters ----------------------------------------------------------------

    def dead_letters(
        self, reason: str | None = None, model: str | None = None, limit: int = 200
    ) -> dict[str, Any]:
        """Dead-lettered jobs (newest first, at most ``limit`` read), grouped by reason,
        each with the attempts that led there."""
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, not {limit}")
        ids = cast(list[str], self.client.zrevrange(self.keys.dead_letters, 0, limit - 1))
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        groups: dict[str, list[dict[str, Any]]] = {}
        for data in pipe.execute():
            if not data or data.get("state") != JobState.DEAD_LETTERED.value:
                continue
            record = JobRecord.from_hash(data)
            why = record.reason or "unknown"
            if (reason and why != reason) or (model and record.model != model):
                continue
            chain = [a for a in record.attempts if a.n >= record.chain_start]
            groups.setdefault(why, []).append(
                {
                    "id": record.id,
                    "model": record.model,
                    "workload": record.workload,
                    "state": record.state.value,
                    "attempt": record.attempt,
                    "worker": record.worker,
                    "created_ms": record.created_ms,
                    "ended_ms": record.ended_ms,
                    "reason": record.reason,
                    "error": record.error,
                    "replays": record.replays,
                    "evidence": [
                        {"n": a.n, "worker": a.worker, "outcome": a.outcome, "error": a.error}
                        for a in chain
                    ],
                }
            )
        ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        return {
            "groups": [{"reason": r, "count": len(jobs), "jobs": jobs} for r, jobs in ordered],
            "total": int(self.client.zcard(self.keys.dead_letters)),
        }

    # -- health ----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {"redis": bool(self.client.ping()), "now_ms": self.ledger.time_ms()}


__all__ = ["MAX_LIMIT", "SCAN_CAP", "FleetView", "JobNotFoundError", "WorkerNotFoundError"]
