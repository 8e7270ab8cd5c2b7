"""The watchdog: gridqueue's control-plane loop, run by one leader at a time.

Each tick it renews its Redis lease (its fencing token rides on every write it makes, so a
deposed leader's writes are refused), then:

1. declares DEAD each worker silent for ``stale_after_s``, and sooner each worker whose
   process is gone: its heartbeat is late by one interval and its presence subscription
   has closed, on two looks at least a quarter interval apart (the connection signal).
   Its running attempts move to the ``lost`` hash in the same atomic step. A worker
   dead on its silence may be frozen, not gone: its broker connections are killed
   before anything is published again, and what its consumer took is published again;
2. applies the workload policy to every lost attempt: requeue (published at once, ahead
   of fresh work) or fail explicitly;
3. expires jobs past their deadline, killing their running attempt;
4. publishes dispatches that are due: retries whose backoff passed, and publishes that a
   dead producer or watchdog never finished;
5. sweeps kombu's deliveries for messages taken by a consumer that died before claiming
   them, and publishes those attempts again.

The connection signal cannot declare a live worker dead: a worker whose subscription
alone dropped (a ``CLIENT KILL``, a proxy restart) subscribes again within milliseconds,
while the verdict needs the subscriber gone on two looks a quarter interval apart *and*
its heartbeat late by more than an interval; and it applies only to an incarnation whose
subscription Redis has seen (a worker that never subscribed is judged by its heartbeat).

Liveness is judged on Redis server time, so the watchdog also checks that clock against
its own monotonic one: when the Redis host's clock jumps (an NTP step, a failover to a
replica whose clock is ahead), every heartbeat looks old at once, so no worker is judged
until the fleet has beaten again on the new clock. One item that fails (a script error
on one job) is logged and skipped; it does not abort the rest of the tick.

All state is in Redis; a standby that takes the lease carries on where the leader stopped.
Every step is a range query over what is due, so a tick costs O(log n + k).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gridqueue.celeryapp import celery_for
from gridqueue.celerystate import NodeLostAnnouncer
from gridqueue.dispatch import Dispatcher
from gridqueue.keys import attempt_id, split_attempt_id
from gridqueue.ledger import FOLD_BATCH, AttemptEnd, Ledger, Scan, connect_redis
from gridqueue.logs import get_logger
from gridqueue.settings import Settings
from gridqueue.states import Outcome

log = get_logger("gridqueue.watchdog")

_T = TypeVar("_T")

# How often the leader prunes what outlived the job retention (workers long gone, dead
# letters whose records expired): bounded keys need no faster sweep.
_FORGET_EVERY_S = 1.0
# How often the leader checks that every published, unclaimed attempt's message still
# exists: it reads the queues, so it runs seldom; and one claim grace after the leader
# regains Redis (a restart may have cut a consumer between its BRPOP and its unacked write).
_MESSAGE_CHECK_EVERY_S = 30.0
# Lost attempts ended (and their successors published) per batch of round trips.
_REQUEUE_BATCH = 256
# The first batch, small enough to fit a tick's budget however slow Redis is today.
_REQUEUE_FIRST_BATCH = 8

_LOST_ERRORS = {
    "worker_lost": "the worker running this attempt was lost",
    "node_lost": "the node running this attempt died or stopped; its outcome is unknown",
    "gpu_fault": "the node's GPU failed its health check; the attempt was moved",
    "evacuated": "an operator quarantined the node; the attempt was moved",
    "stalled": "the attempt stopped beating or making progress; its child was killed",
}


@dataclass
class ClockWatch:
    """Notices a jump of the Redis host's clock: the server time read by two scans must
    advance as the watchdog's monotonic clock did between them, within the reads' own
    round trips and ``tolerance_s``."""

    tolerance_s: float
    _last: tuple[int, float, float] | None = None  # (server ms, mono before, mono after)

    def jumped_ms(self, server_ms: int, mono_before: float, mono_after: float) -> int:
        """The jump since the previous reading (0 if none): positive when the server
        clock ran ahead of the monotonic one, negative when it went back."""
        last, self._last = self._last, (server_ms, mono_before, mono_after)
        if last is None:
            return 0
        last_ms, last_before, last_after = last
        elapsed_ms = server_ms - last_ms
        shortest_ms = (mono_before - last_after) * 1000
        longest_ms = (mono_after - last_before) * 1000
        tolerance_ms = self.tolerance_s * 1000
        if elapsed_ms > longest_ms + tolerance_ms:
            return int(elapsed_ms - longest_ms)
        if elapsed_ms < shortest_ms - tolerance_ms:
            return int(elapsed_ms - shortest_ms)
        return 0


@dataclass
class TickReport:
    leader: bool
    workers_declared_dead: int = 0
    attempts_requeued: int = 0
    attempts_failed: int = 0
    jobs_expired: int = 0
    workers_quarantined: int = 0
    attempts_stalled: int = 0
    dispatched: int = 0
    deliveries_recovered: int = 0
    clock_jump_ms: int = 0
    items_failed: int = 0
    lost_deferred: int = 0  # lost attempts left for the next tick (the tick's time budget)
    duration_s: float = 0.0


class Watchdog:
    def __init__(self, settings: Settings, owner: str | None = None) -> None:
        self.settings = settings
        self.ledger = Ledger(connect_redis(settings.redis_target), settings)
        # The stats fold's own client: it runs in a thread of its own (see run).
        self._folder = Ledger(connect_redis(settings.redis_target), settings)
        app = celery_for(settings)
        self.broker = settings.broker
        self.dispatcher = Dispatcher(self.ledger, app)
        # Flower hears of an attempt whose node died from us: that node cannot speak.
        self.announcer = NodeLostAnnouncer(app, self.ledger, settings.celery_events)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.token: str | None = None
        self._budget_ends = float("inf")  # when this tick stops requeueing (perf_counter)
        self._last_ok = float("inf")
        self._blind_until = 0.0
        liveness_beat_s = max(
            (w.liveness_interval_s for w in self.ledger.workloads.values()), default=0.0
        )
        self.grace_s = self.settings.stale_after_s + max(
            liveness_beat_s, self.settings.heartbeat_interval_s
        )
        self.clock = ClockWatch(tolerance_s=self.settings.stale_after_s / 4)
        self._next_forget = 0.0
        self._next_message_check = 0.0
        # The connection signal's second look: name -> (server ms, monotonic s) of the first
        # tick that found the worker late with its subscription gone.
        self._unreachable_since: dict[str, tuple[int, float]] = {}
        self.confirm_s = self.settings.heartbeat_interval_s / 4

    def tick(self) -> TickReport:
        started = time.perf_counter()
        now = time.monotonic()
        held, value = self.ledger.lease(self.owner, int(self.settings.watchdog_lease_s * 1000))
        if not held:
            if self.token is not None:
                log.warning("watchdog.lost_lease", owner=self.owner, leader=value)
                self.token = None
            return TickReport(leader=False, duration_s=time.perf_counter() - started)
        if value != self.token or now - self._last_ok > self.settings.stale_after_s / 2:
            # A new leader, or one that could not reach Redis for a while (a Redis restart,
            # a partition), has not watched the heartbeats: give every node one grace
            # period to beat again before judging anyone dead or stalled.
            self._blind_until = now + self.grace_s
            self._next_message_check = now + self.settings.dispatch_grace_s + self.grace_s
            if value != self.token:
                log.info("watchdog.leading", owner=self.owner, token=value, grace_s=self.grace_s)
            else:
                log.info("watchdog.grace", owner=self.owner, grace_s=self.grace_s)
            self.token = value
        report = TickReport(leader=True)
        before = time.monotonic()
        scan = self.ledger.scan()
        report.clock_jump_ms = self.clock.jumped_ms(scan.now_ms, before, time.monotonic())
        if report.clock_jump_ms:
            # Every heartbeat and watch now looks older (or younger) than it is: hold all
            # verdicts until the fleet has beaten again on the new clock.
            self._blind_until = time.monotonic() + self.grace_s
            log.warning(
                "watchdog.clock_jump", owner=self.owner, jump_ms=report.clock_jump_ms,
                grace_s=self.grace_s,
            )  # fmt: skip
        moved = False
        judging = now >= self._blind_until
        silent: list[str] = []
        for name in scan.stale_workers if judging else ():
            count = self._item(report, self.ledger.declare_dead, name, value)
            if count is not None:
                report.workers_declared_dead += 1
                moved = True
                silent.append(name)
                log.warning("worker.declared_dead", worker=name, attempts=count, signal="heartbeat")
        if silent:
            # Before anything of theirs is published again (below): a silent node may be
            # frozen with a BRPOP pending, which would pop the requeued attempts.
            self._cut_off(silent, value, report)
        else:
            self._item(report, self.broker.retry_cut_off, self.ledger)
        confirmed = self._confirmed_unreachable(scan, now)
        for name in confirmed if judging else ():
            count = self._item(report, self.ledger.declare_dead, name, value, "connection")
            self._unreachable_since.pop(name, None)
            if count is not None:
                report.workers_declared_dead += 1
                moved = True
                log.warning(
                    "worker.declared_dead", worker=name, attempts=count, signal="connection"
                )
        for name, action in self._apply_health(scan.health_changes, value, report):
            if action in ("evacuated", "draining"):
                report.workers_quarantined += 1
                moved |= action == "evacuated"
                log.warning("worker.quarantined", worker=name, action=action)
            elif action == "probation":
                log.info("worker.probation", worker=name)
        lapsed = [(m, "liveness") for m in scan.liveness_lapsed]
        lapsed += [(m, "progress") for m in scan.progress_lapsed]
        for member, kind in lapsed if judging else ():
            verdict = self._item(report, self.ledger.stall, member, kind, value)
            stalled, quarantined = verdict or (False, False)
            if stalled:
                report.attempts_stalled += 1
                moved = True
                log.warning("attempt.stalled", attempt=member, kind=kind)
            if quarantined:
                report.workers_quarantined += 1
                log.warning("worker.quarantined", attempt=member, action="repeated stalls")
        # Everything above moved attempts to the lost hash in the same atomic step as its
        # verdict; requeue them now (and a successor would, had we died just before).
        # The lease was renewed as the tick began: work that would outlast half of it (a
        # rack of nodes dead at once, each attempt a few round trips) waits for the next
        # tick, which finds it where it was, so the lease never lapses mid-tick (a lapse
        # would make the next tick a new leader's, blind for a grace period).
        self._budget_ends = started + self.settings.watchdog_lease_s / 2
        with self.announcer.held():  # its events wait: the requeue has the process's time
            self._requeue_lost(self.ledger.lost_attempts() if moved else scan.lost, value, report)
        for name in scan.probation_due:
            if self._item(report, self.ledger.end_probation, name, value):
                log.info("worker.readmitted", worker=name)
        for job_id in scan.expired_jobs:
            if self._item(report, self.ledger.expire, job_id, value):
                report.jobs_expired += 1
                log.info("job.expired", job=job_id)
        due = list(scan.due_dispatches)
        for member in self.broker.recover_stranded(self.ledger, value):
            report.deliveries_recovered += 1
            log.warning("attempt.delivery_stranded", attempt=member)
            if member not in due:
                due.append(member)
        if now >= self._next_message_check:
            self._next_message_check = now + _MESSAGE_CHECK_EVERY_S
            for member in self._item(report, self.broker.find_lost, self.ledger, value) or ():
                report.deliveries_recovered += 1
                log.warning("attempt.message_lost", attempt=member)
                if member not in due:
                    due.append(member)
        for member in due:
            report.dispatched += bool(self._item(report, self.dispatcher.publish, member))
        if now >= self._next_forget:
            self._next_forget = now + _FORGET_EVERY_S
            self._item(report, self.ledger.forget, value)
        # A long tick is no blind spot: we were in touch with Redis all along.
        self._last_ok = time.monotonic()
        report.duration_s = time.perf_counter() - started
        return report

    def _cut_off(self, names: list[str], token: str, report: TickReport) -> None:
        """Kill the broker connections of workers just declared dead on their heartbeat,
        then publish again at once what their consumers took but never recorded.

        A frozen consumer (SIGSTOP, a hung host, a partition that closes no socket) with a
        ``BRPOP`` pending is still a blocked client to Redis: a message published to its
        queue may be popped into a socket that no one reads, and it is then in neither the
        queue nor kombu's ``unacked``. Killing the connection ends the ``BRPOP``, so the
        requeued attempts reach live consumers. What it popped before the kill (fresh work
        published while it was silent) is found by ``find_lost_messages`` on the dead
        workers' models, now rather than on its 30 s round; a message caught in flight by
        a live consumer at that moment is published twice, which the claim refuses.
        The presence connection has a name of its own and is left alone; when the node
        thaws, its heartbeat is refused and it reconnects and registers again."""
        killed = self._item(report, self.broker.cut_off, self.ledger, names)
        models: set[str] = set()
        for name in names:
            record = self._item(report, self.ledger.worker, name)
            models.update(record.models if record else ())
        log.warning("worker.connections_cut", workers=names, connections=killed)
        if not models:
            return
        found = self._item(report, self.broker.find_lost_of, self.ledger, token, sorted(models))
        for member in found or ():
            report.deliveries_recovered += 1
            log.warning("attempt.message_lost", attempt=member, cut_off=names)
            report.dispatched += bool(self._item(report, self.dispatcher.publish, member))

    def _apply_health(
        self, names: list[str], token: str, report: TickReport
    ) -> list[tuple[str, str | None]]:
        """The verdicts queued since the last tick, applied in one round trip (as many as
        the scan's batch): one per worker is queued when it registers, and a fleet that
        starts at once must not hold the tick for a round trip each. An item that fails
        is logged and skipped, as :meth:`_item` does."""
        if not names:
            return []
        actions: list[tuple[str, str | None]] = []
        replies = self.ledger.apply_health_all(names, token)
        for name, reply in zip(names, replies, strict=True):
            if isinstance(reply, Exception):
                report.items_failed += 1
                log.error("watchdog.item_failed", verb="apply_health", item=name, error=repr(reply))
                actions.append((name, None))
            else:
                actions.append((name, reply))
        return actions

    def _confirmed_unreachable(self, scan: Scan, now: float) -> list[str]:
        """Workers found late with their subscription gone on this look and on one at least
        ``confirm_s`` earlier. A worker seen so for the first time waits for the next look
        (``next_tick_in`` brings it forward); one that is no longer so is forgotten."""
        seen = set(scan.unreachable_workers)
        for name in list(self._unreachable_since):
            if name not in seen:
                del self._unreachable_since[name]
        confirmed = []
        for name in scan.unreachable_workers:
            first_ms, _ = self._unreachable_since.setdefault(name, (scan.now_ms, now))
            if scan.now_ms - first_ms >= self.confirm_s * 1000:
                confirmed.append(name)
        return confirmed

    def next_tick_in(self, elapsed_s: float) -> float:
        """Seconds to wait before the next tick: one tick period, or less when a worker
        found unreachable awaits its second look."""
        wait_s = self.settings.watchdog_tick_s - elapsed_s
        now = time.monotonic()
        for _, first in self._unreachable_since.values():
            if first + self.confirm_s > now:
                wait_s = min(wait_s, first + self.confirm_s - now)
        return max(0.0, wait_s)

    def _item(self, report: TickReport, verb: Callable[..., _T], *args: Any) -> _T | None:
        """Apply one verb to one item. A failure particular to the item (a script error,
        a bad record) is logged and skipped, so it cannot hold up the rest of the tick;
        losing Redis itself ends the tick."""
        try:
            return verb(*args)
        except (RedisConnectionError, RedisTimeoutError):
            raise
        except Exception as exc:
            report.items_failed += 1
            log.exception("watchdog.item_failed", verb=verb.__name__, item=args[0], error=repr(exc))
            return None

    def _requeue_lost(self, lost: dict[str, str], token: str, report: TickReport) -> None:
        """Apply the class policy to attempts whose worker is gone or evacuated, until the
        tick's budget ends (a perf_counter time): those left stay in the lost hash.

        A node's or a rack's attempts go in batches: the records are read in one round
        trip, the verdicts committed in another (each its own compare-and-set script),
        the requeued attempts' dispatches leased in one and released in one. A batch that
        fails as a whole is done again one attempt at a time, so one bad item holds up
        nothing."""
        items = list(lost.items())
        done = 0
        size = _REQUEUE_FIRST_BATCH  # then sized from what the last batch cost
        while done < len(items):
            started = time.perf_counter()
            if started >= self._budget_ends:
                report.lost_deferred = len(items) - done
                break
            batch = items[done : done + size]
            done += len(batch)
            ends: list[AttemptEnd | None] | None = None
            if len(batch) > 1:
                ends = self._item(report, self._end_lost_many, batch, token)
            if ends is None:
                ends = [
                    self._item(report, self._end_lost, *split_attempt_id(m), outcome, token)
                    for m, outcome in batch
                ]
            due: list[str] = []
            for (member, outcome), end in zip(batch, ends, strict=True):
                if end is not None:
                    self._account_lost(member, outcome, end, report, due)
            sent = self._item(report, self.dispatcher.publish_many, due) if len(due) > 1 else None
            if sent is not None:
                report.dispatched += sent
            else:
                for member in due:
                    report.dispatched += bool(self._item(report, self.dispatcher.publish, member))
            per_item_s = (time.perf_counter() - started) / len(batch)
            left_s = self._budget_ends - time.perf_counter()
            size = max(1, min(_REQUEUE_BATCH, int(left_s / max(per_item_s, 1e-6))))

    def _end_lost_many(self, batch: list[tuple[str, str]], token: str) -> list[AttemptEnd | None]:
        lost = []
        for member, outcome in batch:
            job_id, attempt = split_attempt_id(member)
            error = _LOST_ERRORS.get(outcome, "the worker running this attempt was lost")
            lost.append((job_id, attempt, Outcome(outcome), error))
        return list(self.ledger.end_lost_attempts(lost, token))

    def _account_lost(
        self, member: str, outcome: str, end: AttemptEnd, report: TickReport, due: list[str]
    ) -> None:
        """Count one lost attempt's verdict, and list its successor to publish if due now."""
        job_id, attempt = split_attempt_id(member)
        if end.status == "retry" and end.next_attempt:
            report.attempts_requeued += 1
            if end.after_s == 0:
                due.append(attempt_id(job_id, end.next_attempt))
        elif end.status == "ended":
            report.attempts_failed += 1
        if outcome == Outcome.NODE_LOST.value and end.status in ("retry", "ended"):
            self.announcer.node_lost(job_id, attempt)
        log.info(
            "attempt.lost",
            job=job_id,
            attempt=attempt,
            outcome=outcome,
            decision=end.status,
            state=end.state,
            next_attempt=end.next_attempt,
        )

    def _end_lost(self, job_id: str, attempt: int, outcome: str, token: str) -> AttemptEnd:
        return self.ledger.end_attempt(
            job_id,
            attempt,
            Outcome(outcome),
            error=_LOST_ERRORS.get(outcome, "the worker running this attempt was lost"),
            token=token,
        )

    def fold(self) -> int:
        """The leader's share of the stats fold: one batch of the events written since the
        last (see ``Ledger.fold_stats``); how many it folded."""
        if self.token is None:
            return 0
        return self._folder.fold_stats(batches=1)

    def _fold_loop(self, stop: threading.Event) -> None:
        """The stats fold, beside the ticks rather than in them: a burst of events (a
        fleet's start, a rack's failover) is folded in short batches, one after the other,
        and never makes a tick longer."""
        while not stop.is_set():
            try:
                folded = self.fold()
            except RedisError:
                folded = 0  # the tick says so; the next batch tries again
            except Exception as exc:  # a bug in the fold must not stop the counters for good
                log.exception("watchdog.fold_failed", owner=self.owner, error=repr(exc))
                folded = 0
            if folded < FOLD_BATCH:
                stop.wait(self.settings.watchdog_tick_s)

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        log.info("watchdog.started", owner=self.owner, tick_s=self.settings.watchdog_tick_s)
        failing = False
        folding = threading.Thread(
            target=self._fold_loop, args=(stop,), name="gq-stats-fold", daemon=True
        )
        folding.start()
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self.tick()
                    if failing:
                        log.info("watchdog.redis_recovered", owner=self.owner)
                        failing = False
                except RedisError as exc:
                    if not failing:
                        log.warning("watchdog.redis_error", owner=self.owner, error=str(exc))
                    failing = True
                except Exception as exc:  # the control plane must outlive any one bad tick
                    log.exception("watchdog.tick_failed", owner=self.owner, error=repr(exc))
                    failing = True
                stop.wait(self.next_tick_in(time.monotonic() - started))
        finally:
            if self.token is not None:
                with contextlib.suppress(RedisError):
                    self.ledger.resign(self.token)
            log.info("watchdog.stopped", owner=self.owner)
