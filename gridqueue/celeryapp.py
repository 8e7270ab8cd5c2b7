"""The Celery app gridqueue runs on, configured for fenced, ledger-owned redelivery.

- acks_late, prefetch 1 and no prefetch beyond free slots: kombu's ``unacked`` holds
  roughly the running attempts and nothing else.
- ``visibility_timeout`` is ten years in every gridqueue process, so kombu never
  redelivers behind the ledger's back; the watchdog requeues instead.
- JSON only; no result backend (the ledger holds the visible result).
- Redis priority steps: a requeued attempt (priority 0) goes ahead of fresh work.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

TASK_NAME = "gridqueue.attempt"
NEVER_REDELIVER_S = 10 * 365 * 86_400
PRIORITY_STEPS = [0, 3, 6, 9]


def make_celery(redis_url: str) -> Celery:
    app = Celery("gridqueue", broker=redis_url, set_as_current=False)
    transport: dict[str, Any] = {
        "visibility_timeout": NEVER_REDELIVER_S,
        "priority_steps": PRIORITY_STEPS,
        "sep": ":",
    }
    app.conf.update(
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        result_accept_content=["json"],
        task_acks_late=True,
        task_acks_on_failure_or_timeout=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        task_default_queue="gq.default",
    )
    return app
