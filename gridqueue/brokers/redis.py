"""The ledger's own Redis as the broker (kombu's Redis transport): gridqueue's default.

kombu keeps a delivered message in the shared ``unacked`` hash and would redeliver it
after its visibility timeout; gridqueue sets that timeout to ten years and owns
redelivery itself. So on this broker the watchdog sweeps ``unacked`` for deliveries whose
consumer died before claiming, and looks for messages lost between kombu's BRPOP and its
``unacked`` write (see ``sweep_deliveries.lua`` and ``find_lost_messages.lua``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gridqueue.connection import RedisTarget

if TYPE_CHECKING:
    from celery import Celery

    from gridqueue.ledger import Ledger


@dataclass(frozen=True)
class RedisBroker:
    target: RedisTarget
    name: str = "redis"

    @property
    def url(self) -> str:
        return self.target.url

    def configure(self, app: Celery) -> None:
        from gridqueue.celeryapp import NEVER_REDELIVER_S, PRIORITY_STEPS

        transport: dict[str, Any] = {
            "visibility_timeout": NEVER_REDELIVER_S,
            "priority_steps": PRIORITY_STEPS,
            **self.target.broker_options(),
        }
        app.conf.update(
            broker_transport_options=transport,
            # kombu's Redis transport takes no more than the free slots: unacked holds
            # roughly the running attempts.
            worker_disable_prefetch=True,
        )

    def message_priority(self, step: int) -> int:
        return step  # kombu's Redis transport serves step 0 first

    def prepare_worker(self) -> None:
        from gridqueue.celeryapp import own_redelivery_in_this_worker

        own_redelivery_in_this_worker()  # or a Redis restart would stop the whole fleet

    def recover_stranded(self, ledger: Ledger, token: str) -> list[str]:
        return ledger.sweep_deliveries(token)

    def find_lost(self, ledger: Ledger, token: str) -> list[str]:
        return ledger.find_lost_messages(token)

    def check(self, timeout_s: float) -> None:
        """The ledger's start check (``require_redis``) covers this broker."""
