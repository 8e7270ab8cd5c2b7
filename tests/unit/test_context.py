"""What a handler's ``ctx.progress()`` answers when the ledger cannot confirm its attempt."""

from __future__ import annotations

import time

from redis.exceptions import ConnectionError as RedisConnectionError

from gridqueue.handlers import Context


class Sink:
    """A ledger's progress verb that answers, or fails as a Redis partition does."""

    def __init__(self) -> None:
        self.reachable = True
        self.current = True

    def progress(
        self, job_id: str, attempt: int, worker: str, info: str = "", stall_ms: int = 60_000
    ) -> bool:
        if not self.reachable:
            raise RedisConnectionError("partitioned")
        return self.current


def context(sink: Sink, confirm_within_s: float) -> Context:
    ctx = Context("j", 1, "w1", sink, confirm_within_s=confirm_within_s)
    ctx.progress_interval_s = 0.0  # every call writes
    return ctx


def test_progress_says_true_while_the_attempt_is_confirmed() -> None:
    assert context(Sink(), 1.0).progress("step") is True


def test_progress_rides_out_a_blip_shorter_than_stale_after() -> None:
    sink = Sink()
    ctx = context(sink, confirm_within_s=5.0)
    assert ctx.progress()
    sink.reachable = False
    assert ctx.progress() is True  # a blip must not fail the user's work


def test_progress_says_false_once_the_attempt_cannot_be_confirmed() -> None:
    """Cut off for longer than stale_after_s, the attempt may be another worker's now."""
    sink = Sink()
    ctx = context(sink, confirm_within_s=0.2)
    assert ctx.progress()
    sink.reachable = False
    time.sleep(0.3)
    assert ctx.progress() is False
    sink.reachable = True  # back in touch, and still current: carry on
    assert ctx.progress() is True


def test_progress_says_false_for_good_once_superseded() -> None:
    sink = Sink()
    ctx = context(sink, confirm_within_s=5.0)
    sink.current = False
    assert ctx.progress() is False
    sink.current = True
    assert ctx.progress() is False
