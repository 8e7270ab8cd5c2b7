"""Publishing attempts to Celery, as the ledger's dispatch index says.

Every attempt is its own Celery task, id ``<job>.<n>``, on the queue of its model. A
publish is leased in the ledger first (the producer's publish of attempt 1 by submit
itself, in the same step that writes the job): if the publisher dies before it acks the
lease, the watchdog publishes again when the lease lapses. A duplicate message is harmless,
because the claim admits only one delivery of the current attempt.

Two ways out, chosen by the broker (:meth:`Broker.message_renderer`):

- **The ledger's own Redis** (the default): the message is rendered through Celery and
  kombu (:mod:`gridqueue.brokers.rendering`) and the ledger's script publishes it. Attempt
  1 goes out inside ``submit.lua``, with the job, and has no lease at all; any other
  publish goes out inside ``end_dispatch.lua``, only while the lease is still ours, and a
  batch of them (a rack's requeue) in one pipelined round trip.
- **Any other broker** (RabbitMQ): Celery's ``send_task``, then ``end_dispatch``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from gridqueue.brokers import Broker
from gridqueue.brokers.rendering import MessageRenderer, RenderedMessage
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
        self.renderer: MessageRenderer | None = self.broker.message_renderer(app)

    def render(self, member: str, model: str, workload: str) -> RenderedMessage | None:
        """Attempt ``member``'s message for a ledger script to publish, or None when the
        broker is not the ledger's Redis, or the message could not be rendered (the
        caller then takes the lease path: nothing is lost)."""
        if self.renderer is None:
            return None
        job_id, attempt = split_attempt_id(member)
        try:
            return self.renderer.render(
                TASK_NAME,
                member,
                [job_id, attempt],
                queue_for_model(self.ledger.settings.namespace, model),
                self._priority(workload, attempt),
            )
        except Exception as exc:  # kombu errors: the dispatch entry covers it
            log.warning("dispatch.render_failed", attempt=member, error=repr(exc))
            return None

    def publish(self, member: str, own_lease: str = "") -> bool:
        """Publish attempt ``member`` if it is still the job's queued attempt and its
        dispatch is due (or leased to us: ``own_lease``, the producer's from submit)."""
        lease = self.ledger.begin_dispatch(member, own_lease)
        if lease is None:
            return False
        return self._send(lease)

    def publish_own(self, member: str, model: str, workload: str, lease: str) -> bool:
        """Publish attempt 1 under the lease its producer got from submit (the dispatch
        entry's score): the submit path of a broker the ledger's scripts cannot reach (on
        the ledger's Redis, submit publishes attempt 1 itself and writes no lease). The
        lease is the producer's until the grace passes, so it is not taken again first.
        Should the grace have passed meanwhile, or the job have ended, the message may be
        a second one or a stale one: the claim refuses either, as it refuses any
        duplicate. The entry stays until :meth:`Ledger.end_dispatch` finds the lease still
        its own."""
        return self._send(DispatchLease(member, model, workload, lease))

    def publish_many(self, members: list[str]) -> int:
        """:meth:`publish` for many due attempts (a rack's requeue): the leases are taken
        in one round trip and released in another, which on the ledger's Redis publishes
        the messages too; elsewhere the messages go one by one between the two. Returns
        how many were published."""
        leases = [lease for lease in self.ledger.begin_dispatch_many(members) if lease]
        if self.renderer is not None:
            rendered = [
                (lease, self.render(lease.member, lease.model, lease.workload)) for lease in leases
            ]
            ready = [(lease, message) for lease, message in rendered if message is not None]
            ended = self.ledger.end_dispatch_many(
                [lease for lease, _ in ready], [message for _, message in ready]
            )
            return sum(ended)
        with self.app.producer_or_acquire() as producer:  # one producer for the batch
            sent = [lease for lease in leases if self._message(lease, producer)]
        self.ledger.end_dispatch_many(sent)
        return len(sent)

    def _send(self, lease: DispatchLease) -> bool:
        if self.renderer is not None:
            message = self.render(lease.member, lease.model, lease.workload)
            # Published only while the lease is ours: else its holder publishes.
            return message is not None and self.ledger.end_dispatch(lease, message)
        if not self._message(lease):
            return False
        self.ledger.end_dispatch(lease)
        return True

    def _priority(self, workload_name: str, attempt: int) -> int:
        """The message priority of an attempt of this class, as the broker writes it."""
        workload = self.ledger.workloads.get(workload_name)
        if workload is None:
            priority = 6
        else:
            priority = workload.priority if attempt == 1 else workload.requeue_priority
        return self.broker.message_priority(priority)

    def _message(self, lease: DispatchLease, producer: Any = None) -> bool:
        job_id, attempt = split_attempt_id(lease.member)
        try:
            self.app.send_task(
                TASK_NAME,
                args=[job_id, attempt],
                task_id=lease.member,
                queue=queue_for_model(self.ledger.settings.namespace, lease.model),
                priority=self._priority(lease.workload, attempt),
                producer=producer,
            )
        except Exception as exc:  # kombu and redis errors alike
            # The lease stays in the dispatch index: once it lapses, the watchdog
            # publishes again. Nothing is lost by failing here.
            log.warning("dispatch.failed", attempt=lease.member, error=repr(exc))
            return False
        return True
