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

    from gridqueue.brokers.rendering import MessageRenderer
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

    def message_renderer(self, app: Celery) -> MessageRenderer:
        """This broker is the ledger's own server and db (it is built from the ledger's
        target), so the ledger's scripts publish the messages."""
        from gridqueue.brokers.rendering import MessageRenderer

        return MessageRenderer(app)

    def name_connections(self, app: Celery, client_name: str) -> None:
        """``CLIENT SETNAME`` on every connection kombu opens."""
        app.conf.broker_transport_options = {
            **(app.conf.broker_transport_options or {}),
            "client_name": client_name,
        }

    def prepare_worker(self) -> None:
        from gridqueue.celeryapp import own_redelivery_in_this_worker

        own_redelivery_in_this_worker()  # or a Redis restart would stop the whole fleet

    def recover_stranded(self, ledger: Ledger, token: str) -> list[str]:
        return ledger.sweep_deliveries(token)

    def find_lost(self, ledger: Ledger, token: str) -> list[str]:
        return ledger.find_lost_messages(token)

    def cut_off(self, ledger: Ledger, workers: list[str]) -> int:
        """``CLIENT KILL`` every connection named as one of these workers' broker
        connections. A frozen consumer with a ``BRPOP`` pending is still a blocked client to
        Redis and would pop the requeued attempts into a socket that no one reads. One
        ``CLIENT LIST`` per call, however many died: it costs in proportion to the clients
        connected, and only silent deaths pay it."""
        from gridqueue.celeryapp import broker_client_name

        wanted = {broker_client_name(name) for name in workers}
        client = ledger.client
        ids = [c["id"] for c in client.client_list() if c.get("name") in wanted]
        if not ids:
            return 0
        pipe = client.pipeline(transaction=False)
        for client_id in ids:
            pipe.client_kill_filter(_id=client_id)
        # A connection that closed meanwhile answers an error: it is gone all the same.
        replies = pipe.execute(raise_on_error=False)
        return sum(1 for reply in replies if not isinstance(reply, Exception))

    def retry_cut_off(self, ledger: Ledger) -> int:
        return 0  # CLIENT LIST shows every connection at once: nothing to look for again

    def find_lost_of(self, ledger: Ledger, token: str, models: list[str]) -> list[str]:
        """Every published attempt of these models whose message is nowhere, up to now
        (what a cut-off consumer's pending ``BRPOP`` popped), without the usual grace."""
        now_ms = ledger.time_ms()
        return ledger.find_lost_messages(token, models=models, published_before_ms=now_ms)

    def check(self, timeout_s: float) -> None:
        """The ledger's start check (``require_redis``) covers this broker."""
