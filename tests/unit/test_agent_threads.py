"""The worker agent's own threads outlive the errors they meet."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from gridqueue.agent import GridQueueAgent
from gridqueue.celeryapp import make_celery
from gridqueue.runner import WorkerRuntime
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
