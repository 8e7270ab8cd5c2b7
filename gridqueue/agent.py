"""The worker agent: a Celery bootstep in the worker's main process.

It registers the node, heartbeats on Redis server time, kills the children it is told to
kill, and turns a child that died under a task (``WorkerLostError``) into outcome
``worker_lost`` at once, without waiting for the watchdog. When its heartbeat is refused
(the watchdog declared it dead while it was frozen or cut off), it kills every child still
running an attempt (those attempts were already moved elsewhere) and registers again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from typing import Any, ClassVar

from billiard.exceptions import WorkerLostError
from celery import bootsteps
from celery.signals import task_failure
from celery.worker import state as worker_state
from redis.exceptions import RedisError

from gridqueue.keys import split_attempt_id
from gridqueue.logs import get_logger
from gridqueue.runner import WorkerRuntime, current_runtime
from gridqueue.states import Outcome

log = get_logger("gridqueue.agent")


class GridQueueAgent(bootsteps.StartStopStep):  # type: ignore[misc]
    """Register, heartbeat, obey fencing and kill orders; see the module docstring."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}
    label = "gridqueue agent"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.runtime: WorkerRuntime | None = None
        self.epoch = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        self.runtime = current_runtime()
        self._register()
        task_failure.connect(self._on_task_failure, weak=False)
        self._thread = threading.Thread(
            target=self._heartbeat_loop, name="gq-heartbeat", daemon=True
        )
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        task_failure.disconnect(self._on_task_failure)
        if self.runtime is not None:
            with contextlib.suppress(RedisError):
                self.runtime.ledger.unregister(self.runtime.name, self.epoch)
            log.info("worker.stopped", worker=self.runtime.name)

    def _register(self) -> None:
        runtime = self._rt()
        info = json.dumps({"pid": os.getpid(), "celery_queues": runtime.models})
        self.epoch = runtime.ledger.register(
            runtime.name, runtime.models, os.getpid(), runtime.host, runtime.concurrency, info
        )
        log.info("worker.registered", worker=runtime.name, epoch=self.epoch, models=runtime.models)

    def _rt(self) -> WorkerRuntime:
        assert self.runtime is not None
        return self.runtime

    def _heartbeat_loop(self) -> None:
        runtime = self._rt()
        interval_s = runtime.settings.heartbeat_interval_s
        failing = False
        while not self._stop.wait(interval_s):
            try:
                beat = runtime.ledger.heartbeat(runtime.name, self.epoch)
                if beat.fenced:
                    self._on_fenced(beat.state)
                for member in beat.kill:
                    self._kill_attempt(member, why="ordered")
                if failing:
                    log.info("heartbeat.recovered", worker=runtime.name)
                    failing = False
            except RedisError as exc:
                if not failing:
                    log.warning("heartbeat.failed", worker=runtime.name, error=str(exc))
                failing = True

    def _on_fenced(self, state: str | None) -> None:
        """We were declared dead: our attempts live elsewhere now. Kill, then rejoin."""
        runtime = self._rt()
        log.warning("worker.fenced", worker=runtime.name, state=state, epoch=self.epoch)
        for request in _active_requests():
            self._kill_attempt(request.id, why="fenced")
        self._register()

    def _kill_attempt(self, member: str, why: str) -> None:
        for request in _active_requests():
            if request.id == member and request.worker_pid:
                log.warning("attempt.killing", attempt=member, pid=request.worker_pid, why=why)
                with contextlib.suppress(ProcessLookupError):
                    # SIGKILL: a soft limit cannot interrupt a blocking CUDA call.
                    os.kill(request.worker_pid, signal.SIGKILL)

    def _on_task_failure(
        self, sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any
    ) -> None:
        if not isinstance(exception, WorkerLostError) or not task_id or "." not in task_id:
            return
        job_id, attempt = split_attempt_id(task_id)
        try:
            self._rt().end_attempt(job_id, attempt, Outcome.WORKER_LOST, str(exception))
        except RedisError as exc:
            # The attempt stays RUNNING on a live worker; the watchdog's liveness checks
            # catch it later. Say so loudly.
            log.error("attempt.worker_lost_unrecorded", job=job_id, attempt=attempt, error=str(exc))


def _active_requests() -> list[Any]:
    for _ in range(5):
        try:
            return list(worker_state.active_requests)
        except RuntimeError:  # the set changed size while we copied it
            continue
    return []
