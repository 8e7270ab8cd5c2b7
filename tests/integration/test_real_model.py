"""A real model (WordLlama embeddings, weights from its wheel) on real workers: kill -9
the node mid-batch; the job finishes elsewhere with the answer of an uninterrupted run."""

from __future__ import annotations

import signal
import socket
import threading
from typing import Any

import pytest

from gridqueue import GridQueue
from gridqueue.fleet import LocalFleet
from gridqueue.states import JobState
from tests.helpers import wait_for, wait_until_watchdog_judges

pytest.importorskip("wordllama", reason="the 'model' extra is not installed")

from workers.embedding import DIM, MODEL, embed

pytestmark = pytest.mark.integration

TEXTS = [f"sentence number {i} about {topic}" for i, topic in enumerate(["cats", "tax law"] * 10)]


def test_loading_the_model_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.embedding import load_model

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model tried to reach the network")

    load_model.cache_clear()
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    [cat, law] = embed(["i like cats", "tax law"])
    assert len(cat) == DIM and cat != law


def test_kill_9_mid_batch_gives_the_uninterrupted_answer(fleet: LocalFleet, gq: GridQueue) -> None:
    for name in ("m1", "m2"):
        fleet.start_worker(name, models=MODEL, handlers="workers.embedding", concurrency=1)
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["m1", "m2"])
    wait_until_watchdog_judges(gq.ledger)

    job = gq.submit(MODEL, {"texts": TEXTS, "ms_per_text": 150}, workload="batch")
    chunks: list[Any] = []
    reader = threading.Thread(target=lambda: chunks.extend(job.stream(timeout=180)), daemon=True)
    reader.start()
    wait_for(lambda: len(chunks) >= 6, timeout_s=120)
    victim = gq.get(job.id).worker
    assert victim is not None
    fleet.kill(victim, signal.SIGKILL)
    reader.join(timeout=180)

    assert job.result(timeout=60) == {"model": "wordllama-l2_supercat-256", "dim": DIM, "count": 20}
    record = gq.get(job.id)
    assert record.state is JobState.SUCCEEDED
    assert record.attempts[0].worker == victim and record.attempts[-1].worker != victim
    assert record.stream_starts[record.attempts[-1].n] >= 6  # resumed, not restarted
    # The streamed answer is exactly that of an uninterrupted run.
    assert [c["index"] for c in chunks] == list(range(len(TEXTS)))
    assert [c["embedding"] for c in chunks] == embed(TEXTS)
