"""Fault injection into the simulated GPUs of a running worker (drills and tests).

Faults live in Redis beside the worker's record; the worker's simulated probe reads them
on every probe cycle, so an injection takes effect within ``health_interval_s``.
"""

from __future__ import annotations

import json

from gridqueue.errors import ConfigError, WorkerNotFoundError
from gridqueue.keys import Keys
from gridqueue.ledger import connect_redis
from gridqueue.probes.simulated import Fault
from gridqueue.settings import Settings


def _check_simulated(settings: Settings, worker: str) -> None:
    client = connect_redis(settings.redis_url)
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
    client = connect_redis(settings.redis_url)
    key = Keys(settings.namespace).worker_faults(worker)
    raw = client.hget(key, str(gpu))
    if raw:
        fault = Fault.from_dict(json.loads(str(raw))).merge(fault)
    client.hset(key, str(gpu), json.dumps(fault.to_dict()))


def clear_faults(settings: Settings, worker: str) -> None:
    _check_simulated(settings, worker)
    connect_redis(settings.redis_url).delete(Keys(settings.namespace).worker_faults(worker))
