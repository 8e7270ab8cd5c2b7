"""The output stream's fencing script against a real private Redis: random histories of
emits and checkpoints from current and superseded attempts, with failovers that resume
or start over, never leave a gap, a repeat or a chunk out of order.

Each attempt is a deterministic generator: its chunk at position i says ``{"i": i}`` (and
which attempt sent it). The reader's view, the stream, must be chunks 0, 1, 2... with no
position missing or twice, and each chunk must come from the attempt that was current
when it was appended."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from gridqueue.client import GridQueue
from gridqueue.ledger import Ledger, connect_redis, dumps
from gridqueue.settings import Settings
from gridqueue.states import JobState, Outcome
from gridqueue.workloads import WorkloadClass
from tests.helpers import register_sim_worker

pytestmark = pytest.mark.integration

WORKERS = ["w1", "w2", "w3"]
CLASSES = {"stream": WorkloadClass(name="stream", idempotent=True, max_attempts=1000, resume=True)}


@dataclass
class Attempt:
    n: int
    worker: str
    position: int  # the next chunk it emits


@dataclass
class Model:
    """What the stream must hold: (position, attempt) per chunk, and the checkpoint."""

    attempts: list[Attempt] = field(default_factory=list)
    stream: list[int] = field(default_factory=list)  # the attempt that appended chunk i
    checkpoint: int | None = None
    refused: int = 0
    repeated: int = 0

    @property
    def current(self) -> Attempt:
        return self.attempts[-1]


def stream_of(ledger: Ledger, job_id: str) -> list[tuple[str, dict[str, str]]]:
    return ledger.client.xrange(ledger.keys.job_stream(job_id))  # type: ignore[return-value]


def check(ledger: Ledger, job_id: str, model: Model) -> None:
    rows = stream_of(ledger, job_id)
    chunks = [(entry_id, fields) for entry_id, fields in rows if "c" in fields]
    assert [entry_id for entry_id, _ in chunks] == [f"0-{i + 1}" for i in range(len(chunks))]
    positions = [json_i(fields) for _, fields in chunks]
    assert positions == list(range(len(chunks))), "a gap, a repeat or a chunk out of order"
    assert [json_a(fields) for _, fields in chunks] == model.stream
    stats = ledger.stats()
    assert stats.get("stream_chunks_refused", 0) == model.refused
    assert stats.get("stream_chunks_repeated", 0) == model.repeated
    assert stats.get("stream_gaps_refused", 0) == 0


def json_i(fields: dict[str, str]) -> int:
    return int(json.loads(fields["c"])["i"])


def json_a(fields: dict[str, str]) -> int:
    return int(json.loads(fields["c"])["a"])


# One step of a history: an emit or a checkpoint by attempt k (counted back from the
# current one: 0 is current, 1 the one before...), or a failover that resumes or not.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("emit"), st.integers(0, 3), st.integers(1, 4)),
        st.tuples(st.just("checkpoint"), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("failover"), st.booleans(), st.just(0)),
    ),
    max_size=40,
)


@hypothesis_settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=steps)
def test_random_histories_never_gap_repeat_or_reorder(
    redis_url: str, history: list[tuple[str, Any, int]]
) -> None:
    redis.Redis.from_url(redis_url).flushall()
    settings = Settings(redis_url=redis_url)
    ledger = Ledger(connect_redis(redis_url), settings, CLASSES)
    try:
        for name in WORKERS:
            register_sim_worker(ledger, name)
        job_id = "j1"
        ledger.submit(job_id, "sim-llm", "stream", "{}", 0, None)
        assert ledger.claim(job_id, 1, "w1", 100, "").status == "ok"
        model = Model(attempts=[Attempt(1, "w1", 0)])
        for verb, arg, count in history:
            if verb == "emit" or verb == "checkpoint":
                back = min(int(arg), len(model.attempts) - 1)
                attempt = model.attempts[-1 - back]
                current = back == 0
                if verb == "checkpoint":
                    stored = ledger.checkpoint(
                        job_id, attempt.n, attempt.worker, attempt.position, {}
                    )
                    assert stored == current
                    if current:
                        model.checkpoint = attempt.position
                    continue
                for _ in range(count):
                    chunk = {"i": attempt.position, "a": attempt.n}
                    took = ledger.emit(job_id, attempt.n, attempt.worker, attempt.position, chunk)
                    assert took == current
                    if not current:
                        model.refused += 1
                        continue
                    if attempt.position < len(model.stream):
                        model.repeated += 1
                    else:
                        model.stream.append(attempt.n)
                    attempt.position += 1
            else:  # failover: the current attempt fails, the next one is claimed elsewhere
                old = model.current
                end = ledger.end_attempt(job_id, old.n, Outcome.ERROR, worker=old.worker, pid=100)
                assert end.status == "retry" and end.next_attempt == old.n + 1
                worker = WORKERS[old.n % len(WORKERS)]
                claim = ledger.claim(job_id, old.n + 1, worker, 100, "")
                assert claim.status == "ok"
                assert claim.checkpoint_position == model.checkpoint
                start = model.checkpoint if arg and model.checkpoint is not None else 0
                model.attempts.append(Attempt(old.n + 1, worker, start))
            check(ledger, job_id, model)
        # The job ends: the end marker follows the last chunk, and a reader gets each
        # chunk once, in order.
        last = model.current
        assert ledger.complete(job_id, last.n, last.worker, "{}")
        rows = stream_of(ledger, job_id)
        if model.stream:
            assert rows[-1] == (f"0-{len(model.stream) + 1}", {"end": JobState.SUCCEEDED.value})
        gq = GridQueue(settings=settings)
        try:
            read = list(gq.job(job_id).stream(timeout=10))
        finally:
            gq.close()
        assert [c["i"] for c in read] == list(range(len(model.stream)))
        assert dumps([c["a"] for c in read]) == dumps(model.stream)
    finally:
        ledger.client.close()
