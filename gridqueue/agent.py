"""The worker agent: a Celery bootstep in the worker's main process.

It registers the node with its GPUs, heartbeats on Redis server time with a health
snapshot, kills the children it is told to kill, and turns a child that died under a task
(``WorkerLostError``) into outcome ``worker_lost`` at once, without waiting for the
watchdog. It obeys its worker state: a quarantined or probationary node cancels its
consumers (and its claims are refused in the ledger anyway, because remote control is
fire-and-forget). When its heartbeat is refused (the watchdog declared it dead while it
was frozen or cut off), it kills every child still running an attempt (those attempts
were already moved elsewhere) and registers again.

It also fences itself: a node that has had no acknowledged heartbeat for almost
``stale_after_s`` (cut off from Redis) kills its running children and stops consuming
before the watchdog can give their jobs to others, and consumes again only once it has
registered anew. One name is one process: a register is refused while another process
heartbeats under the name.

Its main process also holds a presence subscription (``gridqueue/presence.py``) on a
connection of its own: when the process dies, Redis sees the subscription close at once,
and the watchdog declares the node dead in a fraction of ``stale_after_s``.

Threads: the heartbeat never waits on the GPU probe. The probe runs in its own thread and
under a deadline, so a wedged driver turns into the verdict ``nvml_unresponsive`` while
the heartbeat keeps going.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any, ClassVar

from celery import bootsteps
from celery.signals import worker_shutdown
from celery.worker import state as worker_state
from redis.exceptions import RedisError

from gridqueue.errors import GridQueueError, WorkerNameInUseError
from gridqueue.health import (
    HealthClassifier,
    HealthConfig,
    HealthDocumentSender,
    HealthLevel,
    judged_part,
    monitoring_notices,
)
from gridqueue.keys import split_attempt_id
from gridqueue.logs import get_logger
from gridqueue.presence import Presence
from gridqueue.probes import DeadlineReader, ProbeReading
from gridqueue.runner import WorkerRuntime, current_runtime, on_child_lost
from gridqueue.states import Outcome, WorkerState

log = get_logger("gridqueue.agent")


class HealthMonitor:
    """Reads the probe on its own thread and keeps the latest snapshot for the heartbeat."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        assert runtime.probe is not None
        self.runtime = runtime
        settings = runtime.settings
        self.reader = DeadlineReader(runtime.probe, settings.health_probe_timeout_s)
        self.classifier = HealthClassifier(HealthConfig.from_settings(settings))
        self.snapshot = ""
        self.verdict = ""
        # (snapshot, snapshot without its telemetry, verdict) in one assignment, so that
        # the heartbeat thread reads the three of one reading.
        self.latest = ("", "", "")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gq-health", daemon=True)

    def read_once(self) -> ProbeReading:
        reading = self.reader.read()
        verdict = self.classifier.update(reading, time.monotonic())
        document = {
            "probe": reading.probe,
            "note": self.runtime.probe_note,
            "verdict": verdict.level.value,
            "reasons": list(verdict.reasons),
            # Monitoring gaps (a GPU whose Xid events are not watched): shown, not judged.
            "notices": monitoring_notices(reading.gpus),
            "unresponsive": reading.unresponsive,
            "error": reading.error,
            "gpus": [gpu.to_dict() for gpu in reading.gpus],
        }
        if verdict.level.value != self.verdict:
            level = "info" if verdict.level is HealthLevel.HEALTHY else "warning"
            getattr(log, level)(
                "health.verdict", worker=self.runtime.name, verdict=verdict.level.value,
                reasons=list(verdict.reasons),
            )  # fmt: skip
        self.snapshot = json.dumps(document, separators=(",", ":"))
        self.verdict = verdict.level.value
        self.latest = (self.snapshot, judged_part(document), self.verdict)
        return reading

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.runtime.settings.health_interval_s):
            try:
                self.read_once()
            except Exception as exc:  # the monitor must outlive any probe bug
                log.error("health.read_failed", worker=self.runtime.name, error=repr(exc))


class GridQueueAgent(bootsteps.StartStopStep):  # type: ignore[misc]
    """Register, heartbeat, obey fencing, quarantine and kill orders."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}
    label = "gridqueue agent"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.parent = parent
        self.runtime: WorkerRuntime | None = None
        self.health: HealthMonitor | None = None
        self.presence: Presence | None = None
        self.epoch = 0
        self.state = ""
        self._consuming = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fence_thread: threading.Thread | None = None
        self._acked_at = time.monotonic()  # when the last acknowledged heartbeat was sent
        self._self_fenced = False
        self._evicted = False  # another process took over our name
        self._reconcile_queued_at = 0.0
        self._health_sender: HealthDocumentSender = HealthDocumentSender(5.0)  # set in start()

    def start(self, parent: Any) -> None:
        self.runtime = current_runtime()
        self._health_sender = HealthDocumentSender(self.runtime.settings.health_refresh_s)
        self.health = HealthMonitor(self.runtime)
        reading = self.health.read_once()
        self._register_when_free(reading)
        settings = self.runtime.settings
        if settings.connection_signal:
            # After the register: a name held by another live process is not ours to hold.
            self.presence = Presence(
                settings.redis_target,
                self.runtime.ledger.keys.presence(self.runtime.name),
                max_backoff_s=settings.heartbeat_interval_s / 2,
                worker=self.runtime.name,
            )
            self.presence.start()
        self.health.start()
        on_child_lost(self._on_child_lost)
        self._acked_at = time.monotonic()
        self._thread = threading.Thread(
            target=self._heartbeat_loop, name="gq-heartbeat", daemon=True
        )
        self._thread.start()
        self._fence_thread = threading.Thread(
            target=self._fence_loop, name="gq-self-fence", daemon=True
        )
        self._fence_thread.start()

    def _register_when_free(self, reading: ProbeReading) -> None:
        """Register, waiting out a previous incarnation of this name (a restart after a
        kill -9 comes back before its old heartbeat is stale); a name that another live
        process keeps beating under is refused."""
        settings = self._rt().settings
        give_up_at = time.monotonic() + 2 * settings.stale_after_s + 1.0
        while True:
            try:
                self._register(reading)
                return
            except WorkerNameInUseError as exc:
                if time.monotonic() >= give_up_at:
                    log.error("worker.name_in_use", worker=self._rt().name, error=str(exc))
                    self._rt().fatal = exc
                    raise
                time.sleep(settings.heartbeat_interval_s)

    def stop(self, parent: Any) -> None:
        """Warm shutdown begins: take no new work, but keep heartbeating while the pool
        finishes what it runs (Celery stops the pool after this step). Unregistering now
        would hand those attempts to another worker and throw their results away."""
        if self.runtime is None or self._evicted:
            return
        with contextlib.suppress(RedisError, GridQueueError):
            self.runtime.ledger.quarantine(
                self.runtime.name, "shutdown", "warm shutdown", drain=True
            )
        log.info("worker.draining_for_shutdown", worker=self.runtime.name)
        worker_shutdown.connect(self._on_worker_shutdown, weak=False)

    def _on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        """The pool has stopped: nothing runs here any more. Leave the fleet."""
        self._stop.set()
        if self.health is not None:
            self.health.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        on_child_lost(None)
        runtime = self._rt()
        if not self._evicted:
            with contextlib.suppress(RedisError):
                runtime.ledger.unregister(runtime.name, self.epoch)
        if self.presence is not None:  # after the unregister: a stop is no death
            self.presence.stop()
        if runtime.probe is not None:
            with contextlib.suppress(Exception):
                runtime.probe.close()
        log.info("worker.stopped", worker=runtime.name)

    def _rt(self) -> WorkerRuntime:
        assert self.runtime is not None
        return self.runtime

    def _register(self, reading: ProbeReading | None = None) -> None:
        runtime = self._rt()
        gpus = [
            {"index": g.index, "name": g.name, "memory_total_bytes": g.memory_total_bytes}
            for g in (reading.gpus if reading else ())
        ]
        info = json.dumps(
            {"pid": os.getpid(), "queues": runtime.queues, "note": runtime.probe_note}
        )
        self._health_sender.forget()  # registering drops the stored health document
        self.epoch = runtime.ledger.register(
            runtime.name,
            runtime.models,
            os.getpid(),
            runtime.host,
            runtime.concurrency,
            info,
            probe=runtime.probe.name if runtime.probe else "none",
            gpus=gpus if reading else None,
            model_fit=runtime.model_fit,
        )
        record = runtime.ledger.worker(runtime.name)
        self._apply_state(record.state.value if record else WorkerState.ALIVE.value)
        log.info(
            "worker.registered", worker=runtime.name, epoch=self.epoch, state=self.state,
            models=runtime.models, probe=runtime.probe_note,
        )  # fmt: skip

    def _heartbeat_loop(self) -> None:
        runtime = self._rt()
        interval_s = runtime.settings.heartbeat_interval_s
        failing = False
        while not self._stop.wait(interval_s):
            try:
                self._beat_once()
                if failing:
                    log.info("heartbeat.recovered", worker=runtime.name)
                    failing = False
            except RedisError as exc:
                if not failing:
                    log.warning("heartbeat.failed", worker=runtime.name, error=str(exc))
                failing = True
            except Exception as exc:
                # Any other failure must not end this thread silently: the node would be
                # declared dead while it kept consuming. Say so loudly and beat on; if it
                # persists, the self-fence stops the node's work.
                log.exception("heartbeat.error", worker=runtime.name, error=repr(exc))
                failing = True

    def _beat_once(self) -> None:
        runtime = self._rt()
        sent_at = time.monotonic()
        health = self.health
        snapshot, judged, verdict = health.latest if health else ("", "", "")
        document = self._health_sender.to_send(snapshot, judged, sent_at) if snapshot else ""
        beat = runtime.ledger.heartbeat(
            runtime.name,
            self.epoch,
            document,
            verdict,
            held=[request.id for request in _held_requests()],
            present=self.presence is not None and self.presence.up,
        )
        if document and not beat.fenced:
            self._health_sender.sent(judged, sent_at)
        if beat.fenced:
            self._on_fenced(beat.state)
        elif self._self_fenced:
            # Back in touch, and not declared dead meanwhile: still, this node let its
            # attempts go; join again as a new incarnation before taking work.
            self._register()
        else:
            self._apply_state(beat.state or "")
        self._acked_at = sent_at
        self._self_fenced = False
        for member in beat.kill:
            self._kill_attempt(member, why="ordered")

    def _fence_loop(self) -> None:
        """Fence this node when its heartbeats go unacknowledged (a partition from Redis):
        kill the running children before the watchdog could move their jobs, and stop
        consuming until the node has registered again."""
        settings = self._rt().settings
        limit_s = settings.stale_after_s - settings.heartbeat_interval_s
        while not self._stop.wait(settings.heartbeat_interval_s / 2):
            if self._self_fenced or time.monotonic() - self._acked_at < limit_s:
                continue
            self._self_fenced = True
            log.error(
                "worker.self_fenced", worker=self._rt().name,
                unacknowledged_s=round(time.monotonic() - self._acked_at, 3),
            )  # fmt: skip
            self._apply_state(WorkerState.DEAD.value)
            for request in _held_requests():
                self._kill_attempt(request.id, why="self-fenced")

    def _apply_state(self, state: str) -> None:
        """Consume only while ALIVE. The ledger refuses other claims regardless.

        What the consumer actually consumes is checked against that on every beat, not
        only on a change of state: a broker reconnect rebuilds Celery's task consumer,
        and a cancel or an add queued while it was down may land on the old one."""
        if state != self.state:
            log.info("worker.state", worker=self._rt().name, state=state, previous=self.state)
        self.state = state
        want = state == WorkerState.ALIVE.value
        if want != self._consuming:
            self._consuming = want
            log.info("worker.consuming" if want else "worker.not_consuming", worker=self._rt().name)
        consumer = getattr(self.parent, "consumer", None)
        # One check queued at a time; one that never ran (a loop torn down) expires.
        if consumer is not None and time.monotonic() - self._reconcile_queued_at > 2.0:
            self._reconcile_queued_at = time.monotonic()
            consumer.call_soon(self._reconcile_consumers, consumer)

    def _reconcile_consumers(self, consumer: Any) -> None:
        """On the consumer's own loop: consume the node's queues exactly while wanted."""
        self._reconcile_queued_at = 0.0
        task_consumer = getattr(consumer, "task_consumer", None)
        if task_consumer is None:  # (re)connecting: the next beat checks again
            return
        want = self._consuming
        for queue in self._rt().queues:
            if task_consumer.consuming_from(queue) == want:
                continue
            log.info("worker.queue", worker=self._rt().name, queue=queue, consume=want)
            if want:
                consumer.add_task_queue(queue)
            else:
                consumer.cancel_task_queue(queue)

    def _on_fenced(self, state: str | None) -> None:
        """We were declared dead: our attempts live elsewhere now. Kill, then rejoin."""
        runtime = self._rt()
        log.warning("worker.fenced", worker=runtime.name, state=state, epoch=self.epoch)
        for request in _held_requests():
            self._kill_attempt(request.id, why="fenced")
        try:
            self._register()
        except WorkerNameInUseError as exc:
            # Another process serves under our name now: it owns the name's record and
            # its attempts. Stop consuming and shut down without touching either.
            log.error("worker.evicted", worker=runtime.name, error=str(exc))
            self._evicted = True
            self._apply_state(WorkerState.STOPPED.value)
            os.kill(os.getpid(), signal.SIGTERM)

    def _kill_attempt(self, member: str, why: str) -> None:
        for request in _held_requests():
            if request.id == member and request.worker_pid:
                log.warning("attempt.killing", attempt=member, pid=request.worker_pid, why=why)
                with contextlib.suppress(ProcessLookupError):
                    # SIGKILL: a soft limit cannot interrupt a blocking CUDA call.
                    os.kill(request.worker_pid, signal.SIGKILL)

    def _on_child_lost(self, task_id: str, pid: int | None, error: str) -> None:
        """A pool child died under a task. If it had claimed the attempt, the attempt ends
        ``worker_lost`` (refused unless that very child held it); if it died before
        claiming, publish the attempt again now (Celery also put the message back on its
        queue: whichever copy comes second is refused by the claim)."""
        if "." not in task_id:
            return
        job_id, attempt = split_attempt_id(task_id)
        runtime = self._rt()
        try:
            ended = False
            if pid is not None:
                end = runtime.end_attempt(
                    job_id, attempt, Outcome.WORKER_LOST, error, pid=pid, epoch=self.epoch
                )
                ended = end.status != "stale"
            if not ended and runtime.ledger.redeliver(job_id, attempt):
                log.warning("attempt.redelivered", job=job_id, attempt=attempt, pid=pid)
                runtime.dispatcher.publish(task_id)
        except RedisError as exc:
            # A claimed attempt stays watched (its liveness lapses, the watchdog acts); an
            # unclaimed one is back on its queue. Say so loudly.
            log.error("attempt.worker_lost_unrecorded", job=job_id, attempt=attempt, error=str(exc))


def _held_requests() -> list[Any]:
    """The requests this node holds: reserved for a pool slot or running in a child."""
    for _ in range(5):
        try:
            return list(worker_state.requests.values())
        except RuntimeError:  # the dict changed size while we copied it
            continue
    return []
