"""Fault injection for drills and tests.

GPU faults go into the simulated GPUs of a running worker: they live in Redis beside the
worker's record; the worker's simulated probe reads them on every probe cycle, so an
injection takes effect within ``health_interval_s``.

:func:`take_one_message` is a node that dies between taking a message off the broker and
claiming it (``python -m gridqueue.faults take REDIS_URL QUEUE``; the drill SIGKILLs it).
"""

from __future__ import annotations

import json

from gridqueue.errors import ConfigError, WorkerNotFoundError
from gridqueue.keys import Keys
from gridqueue.ledger import connect_redis
from gridqueue.probes.simulated import Fault
from gridqueue.settings import Settings


def _check_simulated(settings: Settings, worker: str) -> None:
    client = connect_redis(settings.redis_target)
    probe = client.hget(Keys(settings.namespace).worker(worker), "probe")
    if probe is None:
        raise WorkerNotFoundError(f"no worker {worker!r} is registered; see `gridqueue status`")
    if probe != "simulated":
        raise ConfigError(
            f"worker {worker!r} runs the {probe!r} probe; faults can be injected only into "
            "simulated GPUs (start it with --probe simulated)"
        )


def inject_fault(settings: Settings, worker: str, gpu: int, fault: Fault) -> None:
    """Add ``fault`` to GPU ``gpu`` of ``worker`` (merged with what is already there)."""
    _check_simulated(settings, worker)
    client = connect_redis(settings.redis_target)
    key = Keys(settings.namespace).worker_faults(worker)
    raw = client.hget(key, str(gpu))
    if raw:
        fault = Fault.from_dict(json.loads(str(raw))).merge(fault)
    client.hset(key, str(gpu), json.dumps(fault.to_dict()))


def clear_faults(settings: Settings, worker: str) -> None:
    _check_simulated(settings, worker)
    connect_redis(settings.redis_target).delete(Keys(settings.namespace).worker_faults(worker))


# -- a node that dies between taking a message and claiming it (the drill's ``taken``) -----


def take_one_message(redis_url: str, queue: str, timeout_s: float = 15.0) -> None:
    """Be a gridqueue worker process just long enough to take ONE message, then hang.

    It runs the Celery app of every gridqueue process (same transport options: priority
    steps, visibility timeout) and consumes ``queue`` with a kombu consumer, late ack and
    prefetch 1, as a worker's pool does. kombu moves the delivered message from the queue
    to its ``unacked`` hash; this process prints one JSON line ``{"task_id",
    "delivery_tag"}`` (or ``{}`` if nothing came within ``timeout_s``) and then waits,
    never claiming nor acking, to be SIGKILLed: a node that died after the broker handed
    it a message and before the ledger heard of it. Closing cleanly would let kombu
    restore the message, which is not what a crash does.
    """
    import sys
    import threading
    import time
    from typing import Any

    import kombu

    from gridqueue.celeryapp import celery_for
    from gridqueue.settings import Settings

    k: Any = kombu  # kombu's annotations are partial

    # The broker of every gridqueue process (GRIDQUEUE_BROKER_URL, else Redis), with its
    # queue arguments (RabbitMQ's x-max-priority must match the workers' declaration).
    app = celery_for(Settings(redis_url=redis_url, celery_events=False))
    taken: dict[str, str] = {}

    def on_message(body: Any, message: Any) -> None:
        headers = message.headers or {}
        taken["task_id"] = str(headers.get("id") or "")
        taken["delivery_tag"] = str(message.delivery_tag)

    # The queue exactly as a worker's ``--queues`` declares it.
    declared = app.amqp.queues[queue]
    with app.connection_for_read() as connection:
        channel = connection.channel()
        consumer = k.Consumer(
            channel, queues=[declared], callbacks=[on_message], no_ack=False, accept=["json"]
        )
        consumer.qos(prefetch_count=1)
        consumer.consume()
        give_up_at = time.monotonic() + timeout_s
        while not taken and time.monotonic() < give_up_at:
            try:
                connection.drain_events(timeout=0.2)
            except TimeoutError:
                continue
        sys.stdout.write(json.dumps(taken) + "\n")
        sys.stdout.flush()
        if taken:
            threading.Event().wait()  # hold the message until killed: never ack, never claim


def main(argv: list[str] | None = None) -> None:
    """``python -m gridqueue.faults take REDIS_URL QUEUE [TIMEOUT_S]`` (used by the drill)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[0] != "take":
        raise SystemExit("usage: python -m gridqueue.faults take REDIS_URL QUEUE [TIMEOUT_S]")
    take_one_message(args[1], args[2], float(args[3]) if len(args) > 3 else 15.0)


if __name__ == "__main__":
    main()
