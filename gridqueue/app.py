"""The Celery app of a gridqueue fleet, for Celery's own tools and for Flower.

    celery -A gridqueue.app flower
    celery -A gridqueue.app inspect ping | active | stats
    celery -A gridqueue.app events
    celery -A gridqueue.app control revoke --terminate <job>.<n>

``app`` is built from ``GRIDQUEUE_*`` environment variables (``GRIDQUEUE_REDIS_URL``,
``GRIDQUEUE_CELERY_EVENTS``) exactly as every gridqueue process builds its own, so a tool
run with it carries gridqueue's transport options: the priority steps (Flower's broker
page counts every list of a queue) and the ten-year visibility timeout, so that a
long-lived tool such as Flower never sweeps kombu's ``unacked`` back onto the queues (a
stock client sweeps what is older than kombu's default hour).

Importing this module reads the environment and builds the app; it connects to nothing.
"""

from __future__ import annotations

from gridqueue.celeryapp import celery_for
from gridqueue.settings import Settings

settings = Settings()
app = celery_for(settings)

__all__ = ["app", "settings"]
