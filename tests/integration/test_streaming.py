"""Streamed output and resume on real parts: a private redis-server, real `gridqueue
worker` processes, a real watchdog, a real kill -9 of a node mid-stream."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from gridqueue import GridQueue, JobFailed
from gridqueue.errors import JobNotFoundError
from gridqueue.fleet import LocalFleet
from gridqueue.settings import Settings
from gridqueue.states import JobState
from tests.helpers import wait_for, wait_until_watchdog_judges

pytestmark = pytest.mark.integration

TOKENS = [f"tok{i}" for i in range(60)]


class Reader(threading.Thread):
    """A producer reading a job's stream in the background, as chunks arrive."""

    def __init__(self, gq: GridQueue, job_id: str) -> None:
        super().__init__(daemon=True)
        self.job = gq.job(job_id)
        self.chunks: list[Any] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for chunk in self.job.stream(timeout=120):
                self.chunks.append(chunk)
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_stream_yields_every_chunk_in_order_then_ends(fleet: LocalFleet, gq: GridQueue) -> None:
    fleet.start_worker("w1")
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["w1"])

    job = gq.submit("sim-llm", {"tokens": 30, "ms_per_token": 10})

    assert list(job.stream(timeout=60)) == [f"tok{i}" for i in range(30)]
    assert job.result(timeout=5)["text"] == " ".join(f"tok{i}" for i in range(30))
    # Its stream ends with the marker, and expires with the record.
    stream = gq.ledger.keys.job_stream(job.id)
    assert gq.ledger.client.ttl(stream) > 0
    assert gq.ledger.client.xrevrange(stream, count=1)[0][1] == {"end": "SUCCEEDED"}


def test_stream_of_a_job_that_never_streams_ends_with_it(fleet: LocalFleet, gq: GridQueue) -> None:
    fleet.start_worker("w1")
    fleet.wait_alive(gq.ledger, ["w1"])
    job = gq.submit("sim-llm", {"prompt": "quiet", "ms": 50})
    assert list(job.stream(timeout=60)) == []
    assert not gq.ledger.client.exists(gq.ledger.keys.job_stream(job.id))


def test_stream_of_an_unknown_job_raises(gq: GridQueue) -> None:
    from gridqueue.client import Job

    with pytest.raises(JobNotFoundError):
        list(Job(gq, "no-such-job").stream(timeout=1))


@pytest.mark.parametrize("bad", ["chunk_not_json", "chunk_too_large", "checkpoint_not_json"])
def test_bad_chunk_or_state_fails_the_attempt_with_error(
    fleet: LocalFleet, gq: GridQueue, bad: str
) -> None:
    fleet.start_worker("w1")
    fleet.wait_alive(gq.ledger, ["w1"])
    job = gq.submit("sim-llm", {"tokens": 3, "ms_per_token": 1, "bad": bad}, workload="exclusive")

    with pytest.raises(JobFailed):
        list(job.stream(timeout=60))
    record = gq.get(job.id)
    assert record.state is JobState.FAILED
    [attempt] = record.attempts
    assert attempt.outcome == "error"
    expected = {
        "chunk_not_json": "ChunkNotJSONError",
        "chunk_too_large": "ChunkTooLargeError",
        "checkpoint_not_json": "CheckpointNotJSONError",
    }[bad]
    assert attempt.error is not None and attempt.error.startswith(expected)
    # Nothing half-written: no chunk, no checkpoint.
    assert gq.ledger.client.xlen(gq.ledger.keys.job_stream(job.id)) == 0
    assert record.checkpoint_position is None


def kill_mid_stream(fleet: LocalFleet, gq: GridQueue, workload: str) -> tuple[Reader, str]:
    """Start a 60-token job, kill -9 its node once the reader has 20 chunks; returns the
    reader (joined) and the victim's name."""
    for name in ("w1", "w2"):
        fleet.start_worker(name, concurrency=1)
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["w1", "w2"])
    wait_until_watchdog_judges(gq.ledger)

    job = gq.submit("sim-llm", {"tokens": 60, "ms_per_token": 50}, workload=workload)
    reader = Reader(gq, job.id)
    reader.start()
    wait_for(lambda: len(reader.chunks) >= 20, timeout_s=60)
    victim = gq.get(job.id).worker
    assert victim is not None
    fleet.kill(victim, signal.SIGKILL)
    reader.join(timeout=120)
    assert not reader.is_alive()
    return reader, victim


def test_kill_9_mid_stream_resumes_from_the_checkpoint(fleet: LocalFleet, gq: GridQueue) -> None:
    reader, victim = kill_mid_stream(fleet, gq, "realtime")

    assert reader.error is None, reader.error
    assert reader.chunks == TOKENS  # every chunk once, in order, across the failover
    record = gq.get(reader.job.id)
    assert record.state is JobState.SUCCEEDED
    assert record.attempts[0].outcome == "node_lost"
    assert record.attempts[-1].worker != victim
    # The second attempt continued from a checkpoint (every 5 tokens), not from token 0.
    last = record.attempts[-1].n
    resumed_at = record.stream_starts[last]
    assert resumed_at >= 15 and resumed_at % 5 == 0
    assert record.stream_emits[last] == 60 - resumed_at
    assert record.result["resumed_from"] == resumed_at


def test_kill_9_mid_stream_without_resume_starts_over_but_repeats_nothing(
    redis_url: str, tmp_path: Path
) -> None:
    workloads = tmp_path / "workloads.toml"
    workloads.write_text(
        "[no-resume]\nidempotent = true\nmax_attempts = 3\nliveness_timeout_s = 2.0\n"
        "stall_timeout_s = 30.0\nresume = false\n"
    )
    settings = Settings(redis_url=redis_url, workloads_file=workloads)
    fleet = LocalFleet(
        redis_url, tmp_path / "logs", env={"GRIDQUEUE_WORKLOADS_FILE": str(workloads)}
    )
    gq = GridQueue(settings=settings)
    try:
        reader, _ = kill_mid_stream(fleet, gq, "no-resume")
        assert reader.error is None, reader.error
        assert reader.chunks == TOKENS
        record = gq.get(reader.job.id)
        last = record.attempts[-1].n
        assert record.stream_starts[last] == 0  # started over...
        assert record.stream_emits[last] == 60
        assert record.result["resumed_from"] == 0
        # ...and the chunks the reader already had were dropped, and counted.
        assert gq.ledger.stats()["stream_chunks_repeated"] >= 20
    finally:
        fleet.stop_all()
        gq.close()
