"""Starting a gridqueue worker: handler modules, the Celery app, the agent bootstep."""

from __future__ import annotations

import importlib

from gridqueue.agent import GridQueueAgent
from gridqueue.celeryapp import make_celery
from gridqueue.errors import ConfigError
from gridqueue.handlers import check_model_name, get_handler, registered
from gridqueue.keys import queue_for_model
from gridqueue.runner import WorkerRuntime, install_runtime, register_task
from gridqueue.settings import Settings


def run_worker(
    name: str,
    models: list[str],
    handler_modules: list[str],
    concurrency: int,
    settings: Settings,
    loglevel: str = "INFO",
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
    app = make_celery(settings.redis_url)
    register_task(app)
    install_runtime(WorkerRuntime(name, models, settings, concurrency, app))
    app.steps["worker"].add(GridQueueAgent)
    app.worker_main(
        argv=[
            "worker",
            "--hostname", f"{name}@%h",
            "--queues", ",".join(queue_for_model(m) for m in models),
            "--concurrency", str(concurrency),
            "--pool", "prefork",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel", loglevel,
        ]
    )  # fmt: skip
