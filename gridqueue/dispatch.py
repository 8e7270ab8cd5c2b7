"""Publishing attempts to Celery, as the ledger's dispatch index says.

Every attempt is its own Celery task, id ``<job>.<n>``, on the queue of its model. A
publish is leased in the ledger first (the producer's publish of attempt 1 by submit
itself, in the same step that writes the job): if the publisher dies before it acks the
lease, the watchdog publishes again when the lease lapses. A duplicate message is harmless,
because the claim admits only one delivery of the current attempt.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from gridqueue.brokers import Broker
from gridqueue.celeryapp import TASK_NAME
from gridqueue.keys import queue_for_model, split_attempt_id
from gridqueue.ledger import DispatchLease, Ledger
from gridqueue.logs import get_logger

log = get_logger("gridqueue.dispatch")


class Dispatcher:
    def __init__(self, ledger: Ledger, app: Celery, broker: Broker | None = None) -> None:
        self.ledger = ledger
        self.app = app
        self.broker = broker or ledger.settings.broker

    def publish(self, member: str, own_lease: str = "") -> bool:
        """Publish attempt ``member`` if it is still the job's queued attempt and its
        dispatch is due (or leased to us: ``own_lease``, the producer's from submit)."""
        lease = self.ledger.begin_dispatch(member, own_lease)
        if lease is None:
            return False
        return self._send(lease)

    def publish_own(self, member: str, model: str, workload: str, lease: str) -> bool:
        """Publish attempt 1 under the lease its producer got from submit (the dispatch
        entry's score): the lease is the producer's until the grace passes, so it is not
        taken again first. Should the grace have passed meanwhile, or the job have ended,
        the message may be a second one or a stale one: the claim refuses either, as it
        refuses any duplicate. The entry stays until :meth:`Ledger.end_dispatch` finds the
        lease still its own."""
        return self._send(DispatchLease(member, model, workload, lease))

    def publish_many(self, members: list[str]) -> int:
        """:meth:`publish` for many due attempts (a rack's requeue): the leases are taken
        in one round trip and released in another; the messages go one by one. Returns
        how many were published."""
        leases = [lease for lease in self.ledger.begin_dispatch_many(members) if lease]
        with self.app.producer_or_acquire() as producer:  # one producer for the batch
            sent = [lease for lease in leases if self._message(lease, producer)]
        self.ledger.end_dispatch_many(sent)
        return len(sent)

    def _send(self, lease: DispatchLease) -> bool:
        if not self._message(lease):
            return False
        self.ledger.end_dispatch(lease)
        return True

    def _message(self, lease: DispatchLease, producer: Any = None) -> bool:
        job_id, attempt = split_attempt_id(lease.member)
        workload = self.ledger.workloads.get(lease.workload)
        if workload is None:
            priority = 6
        else:
            priority = workload.priority if attempt == 1 else workload.requeue_priority
        try:
            self.app.send_task(
                TASK_NAME,
                args=[job_id, attempt],
                task_id=lease.member,
                queue=queue_for_model(self.ledger.settings.namespace, lease.model),
                priority=self.broker.message_priority(priority),
                producer=producer,
            )
        except Exception as exc:  # kombu and redis errors alike
            # The lease stays in the dispatch index: once it lapses, the watchdog
            # publishes again. Nothing is lost by failing here.
            log.warning("dispatch.failed", attempt=lease.member, error=repr(exc))
            return False
        return True
