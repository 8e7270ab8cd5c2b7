"""A handler module for tests: the simulated LLM, plus a pool child that dies right after
Celery handed it an attempt and before the attempt's claim, once for each job id listed in
the set ``{ns}:test:die_before_claim``. ``task_prerun`` runs in the child just before the
task body, which claims first: dying there is a pool child lost between the two.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from celery.signals import task_prerun

import workers.simulated  # noqa: F401  (registers sim-llm and its siblings)
from gridqueue.ledger import connect_redis
from gridqueue.settings import Settings

DIE_KEY = "{ns}:test:die_before_claim"


@task_prerun.connect
def _die_before_claim(task_id: str | None = None, **_: Any) -> None:
    settings = Settings()
    client = connect_redis(settings.redis_url)
    job_id = (task_id or "").rpartition(".")[0]
    if client.srem(DIE_KEY.format(ns=settings.namespace), job_id):  # once per listed job
        os.kill(os.getpid(), signal.SIGKILL)
