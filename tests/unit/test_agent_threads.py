"""The worker agent's own threads outlive the errors they meet."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from gridqueue.agent import GridQueueAgent
from gridqueue.celeryapp import make_celery
from gridqueue.runner import AttemptLiveness, WorkerRuntime
from gridqueue.settings import Settings


class FlakyAgent(GridQueueAgent):
    """An agent whose beat fails once with a bug (not a Redis error), then works."""

    def __init__(self) -> None:
        super().__init__(SimpleNamespace(consumer=None))
        settings = Settings(redis_url="redis://127.0.0.1:1/0", heartbeat_interval_s=0.01)
        self.runtime = WorkerRuntime(
            "w1", ["sim-llm"], settings, 1, make_celery(settings.redis_url)
        )
        self.beats = 0

    def _beat_once(self) -> None:
        self.beats += 1
        if self.beats == 1:
            raise ValueError("a bug in one beat")


def test_the_heartbeat_thread_survives_an_exception_that_is_not_redis() -> None:
    agent = FlakyAgent()
    thread = threading.Thread(target=agent._heartbeat_loop, daemon=True)
    thread.start()
    try:
        give_up_at = time.monotonic() + 10
        while agent.beats < 5 and time.monotonic() < give_up_at:
            time.sleep(0.01)
        assert agent.beats >= 5, "the heartbeat thread stopped after one failed beat"
        assert thread.is_alive()
    finally:
        agent._stop.set()
        thread.join(timeout=5)


class BeatLedger:
    """The ledger's ``beat`` as the liveness thread calls it: records each beat, and
    answers as the script would (the attempt is current, or not), or raises."""

    def __init__(self) -> None:
        self.beats: list[tuple[str, float]] = []
        self.superseded: set[str] = set()
        self.broken: set[str] = set()

    def beat(self, job_id: str, attempt: int, worker: str, liveness_ms: int) -> bool:
        if job_id in self.broken:
            raise ValueError("a bug in one attempt's beat")
        self.beats.append((job_id, time.monotonic()))
        return job_id not in self.superseded

    def count(self, job_id: str) -> int:
        return sum(1 for job, _ in self.beats if job == job_id)


def _runtime(ledger: BeatLedger) -> SimpleNamespace:
    return SimpleNamespace(ledger=ledger, name="w1", settings=SimpleNamespace(stale_after_s=5.0))


def test_one_thread_beats_for_every_attempt_of_the_process_each_on_its_interval() -> None:
    ledger = BeatLedger()
    runtime = _runtime(ledger)
    fast = AttemptLiveness(runtime, "fast", 1, 0.2)  # type: ignore[arg-type]
    slow = AttemptLiveness(runtime, "slow", 1, 0.8)  # type: ignore[arg-type]
    threads = threading.active_count()
    started = time.monotonic()
    fast.start()
    slow.start()
    try:
        time.sleep(1.05)
        # fast beats every 0.05 s, slow every 0.2 s, neither at its start.
        assert 10 <= ledger.count("fast") <= 21, ledger.count("fast")
        assert 3 <= ledger.count("slow") <= 5, ledger.count("slow")
        first = min(at for job, at in ledger.beats if job == "fast")
        assert first - started >= 0.045
        assert threading.active_count() <= threads + 1  # one beater, however many attempts
    finally:
        fast.stop()
        slow.stop()
    stopped = len(ledger.beats)
    time.sleep(0.3)
    assert len(ledger.beats) == stopped  # no beat after stop


def test_a_superseded_or_broken_attempt_stops_beating_and_the_others_go_on() -> None:
    ledger = BeatLedger()
    runtime = _runtime(ledger)
    ledger.superseded.add("moved")
    ledger.broken.add("buggy")
    watches = [
        AttemptLiveness(runtime, job, 1, 0.2)  # type: ignore[arg-type]
        for job in ("moved", "buggy", "healthy")
    ]
    for watch in watches:
        watch.start()
    try:
        # Six beats of the healthy attempt (one every 50 ms), however long a busy machine
        # takes to give them: the other two had as long to beat, and must not have.
        deadline = time.monotonic() + 30
        while ledger.count("healthy") < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ledger.count("healthy") >= 6
        assert ledger.count("moved") == 1  # told once it is no longer current
        assert ledger.count("buggy") == 0
    finally:
        for watch in watches:
            watch.stop()
