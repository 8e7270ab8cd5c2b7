"""Baseline: plain Celery on the same Redis, configured as a careful user would
(acks_late, reject_on_worker_lost, prefetch 1) with kombu's default visibility_timeout.

Run as a worker:  python -m celery -A benchmarks.bare_celery worker ...
The task marks each start in Redis so the benchmark can see whether it ran again.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

BROKER = os.environ["BARE_CELERY_BROKER"]

app = Celery("bare", broker=BROKER)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bare.infer")
def infer(key: str, ms: int) -> None:
    client = redis.Redis.from_url(BROKER)
    client.rpush(key, f"{os.getpid()}:{time.time()}")
    time.sleep(ms / 1000)


_counter = None


@app.task(name="bare.noop")
def noop(key: str) -> None:
    """The baseline's no-op: it only records that it ran, so the benchmark can count."""
    global _counter
    if _counter is None:
        _counter = redis.Redis.from_url(BROKER)
    _counter.incr(key)
