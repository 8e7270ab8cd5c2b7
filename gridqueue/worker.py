"""Starting a gridqueue worker: handler modules, the GPU probe, the fit of each model on
this node's GPUs, the Celery app and the agent bootstep."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout

import redis
from celery import Celery

from gridqueue import revoke
from gridqueue.agent import GridQueueAgent
from gridqueue.celeryapp import broker_client_name, celery_for
from gridqueue.errors import ConfigError, RedisUnavailableError
from gridqueue.handlers import check_model_name, get_handler, registered
from gridqueue.keys import Keys, queue_for_model
from gridqueue.ledger import connect_redis
from gridqueue.logs import get_logger
from gridqueue.probes import DeadlineReader, make_probe
from gridqueue.probes.simulated import Fault
from gridqueue.runner import WorkerRuntime, install_runtime, register_task
from gridqueue.settings import Settings

log = get_logger("gridqueue.worker")

GIB = 2**30


def fault_source(client: redis.Redis, keys: Keys, name: str) -> Callable[[], dict[int, Fault]]:
    """Faults injected into this worker's simulated GPUs (``gridqueue fault inject``)."""

    def read() -> dict[int, Fault]:
        raw: dict[str, str] = client.hgetall(keys.worker_faults(name))  # type: ignore[assignment]
        return {int(gpu): Fault.from_dict(json.loads(fault)) for gpu, fault in raw.items()}

    return read


def run_worker(
    name: str,
    models: list[str],
    handler_modules: list[str],
    concurrency: int,
    settings: Settings,
    loglevel: str = "INFO",
    probe_kind: str = "auto",
    sim_gpus: int = 1,
    sim_gpu_name: str = "Simulated H100 80GB",
    sim_gpu_memory_gb: float = 80.0,
) -> None:
    if not name or "@" in name or ":" in name:
        raise ConfigError(f"invalid worker name {name!r}: use a non-empty name without '@' or ':'")
    if not models:
        raise ConfigError("--models needs at least one model name")
    for model in models:
        check_model_name(model)
    for module in handler_modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"cannot import handler module {module!r}: {exc}") from exc
    missing = [m for m in models if get_handler(m) is None]
    if missing:
        raise ConfigError(
            f"no handler registered for {missing} in {handler_modules}; "
            f"registered: {sorted(registered())}"
        )
    # Redis first: the probe's fault source reads it, and a Redis that cannot be reached
    # would otherwise surface as a GPU too small for every model.
    client = connect_redis(settings.redis_target)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise RedisUnavailableError(settings.redis_url, exc) from exc
    # Opening NVML (nvmlInit, device handles) can hang on a wedged driver like any other
    # NVML call: bound it, and refuse to start rather than hang without a heartbeat.
    opener = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gq-probe-open")
    opening = opener.submit(
        make_probe,
        probe_kind,
        sim_gpus=sim_gpus,
        sim_gpu_name=sim_gpu_name,
        sim_gpu_memory_gb=sim_gpu_memory_gb,
        fault_source=fault_source(client, Keys(settings.namespace), name),
    )
    open_timeout_s = 5 * settings.health_probe_timeout_s
    try:
        probe, note = opening.result(timeout=open_timeout_s)
    except FuturesTimeout as exc:
        raise ConfigError(
            f"the {probe_kind} GPU probe did not open within {open_timeout_s:g} s "
            "(nvml_unresponsive: a wedged driver?); this node cannot serve until it answers"
        ) from exc
    finally:
        opener.shutdown(wait=False)
    first = DeadlineReader(probe, settings.health_probe_timeout_s).read()
    largest = max((g.memory_total_bytes or 0 for g in first.gpus), default=0)
    model_fit: dict[str, dict[str, int]] = {}
    fitting = []
    for model in models:
        found = get_handler(model)
        assert found is not None
        required = int(found.gpu_memory_gb * GIB)
        model_fit[model] = {"required_bytes": required, "largest_gpu_bytes": largest}
        if required <= largest:
            fitting.append(model)
        else:
            log.warning(
                "model.does_not_fit",
                model=model,
                required_gib=found.gpu_memory_gb,
                largest_gpu_gib=round(largest / GIB, 1),
            )
    if not fitting:
        raise ConfigError(
            f"none of {models} fits this node's GPUs (largest {largest / GIB:.1f} GiB): "
            "serve a smaller model or run on a bigger GPU"
        )
    log.info("worker.probe", probe=probe.name, note=note, gpus=len(first.gpus))
    queues = [queue_for_model(settings.namespace, m) for m in fitting]
    settings.broker.prepare_worker()  # Redis: or a Redis restart would stop the whole fleet
    # Named broker connections: the watchdog cuts them if this node freezes (see
    # broker_client_name).
    app = celery_for(settings, client_name=broker_client_name(name))
    register_task(app)
    runtime = WorkerRuntime(
        name,
        models,
        settings,
        concurrency,
        app,
        queues=queues,
        model_fit=model_fit,
        probe=probe,
        probe_note=note,
    )
    install_runtime(runtime)
    revoke.install(lambda: runtime.ledger)  # a Celery revoke becomes a ledger cancel
    app.steps["worker"].add(GridQueueAgent)
    try:
        _celery_worker(app, name, queues, concurrency, loglevel, settings.celery_events)
    finally:
        # Celery logs a bootstep's failure and exits 0: a worker that could not join
        # the fleet (its name is in use) must say so and fail.
        if runtime.fatal is not None:
            raise runtime.fatal


def _celery_worker(
    app: Celery, name: str, queues: list[str], concurrency: int, loglevel: str, events: bool
) -> None:
    app.worker_main(argv=celery_worker_argv(name, queues, concurrency, loglevel, events))


def celery_worker_argv(
    name: str, queues: list[str], concurrency: int, loglevel: str, events: bool
) -> list[str]:
    """Celery's worker command line. With ``events`` it sends task events (the app's
    ``worker_send_task_events``) and Celery's event heartbeat (``worker-heartbeat`` every
    2 s), by which Flower and ``celery events`` tell a worker online from offline;
    without, neither. Gossip and mingle stay off: gridqueue's ledger is the fleet's
    membership, and gossip would make every worker listen to every other's events."""
    argv = [
        "worker",
        "--hostname", f"{name}@%h",
        "--queues", ",".join(queues),
        "--concurrency", str(concurrency),
        "--pool", "prefork",
        "--without-gossip",
        "--without-mingle",
        "--loglevel", loglevel,
    ]  # fmt: skip
    if not events:
        argv.append("--without-heartbeat")
    return argv
