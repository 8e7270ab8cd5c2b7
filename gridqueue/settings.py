"""Configuration: every knob, read from ``GRIDQUEUE_*`` environment variables.

Defaults are the safe production values from the design: a 200 ms heartbeat, a worker is
dead after 1 s of silence, the watchdog ticks every 100 ms under a 2 s leader lease.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gridqueue.connection import RedisTarget
from gridqueue.workloads import DEFAULT_WORKLOADS_FILE

if TYPE_CHECKING:
    from gridqueue.brokers import Broker

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    """gridqueue settings; each field maps to ``GRIDQUEUE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="GRIDQUEUE_", extra="ignore")

    redis_url: str = Field(
        DEFAULT_REDIS_URL,
        description="Ledger and broker. redis://[:password@]host:port/db, rediss:// for TLS, "
        "or Sentinels: sentinel://HOST:PORT;sentinel://HOST:PORT/DB (with "
        "GRIDQUEUE_REDIS_SENTINEL_MASTER).",
    )
    redis_sentinel_master: str | None = Field(
        None,
        description="With a sentinel:// URL: the master's name, as in the Sentinels' "
        "`sentinel monitor <name> ...` line.",
    )
    redis_sentinel_password: SecretStr | None = Field(
        None,
        description="The Sentinels' own password (requirepass in sentinel.conf), if any; the "
        "primary's password goes in the URL.",
    )
    redis_min_replicas: int = Field(
        0,
        ge=0,
        description="Durable mode: submit() and each attempt's verdict return only once this "
        "many replicas confirm the write (Redis WAIT). 0: asynchronous replication, a "
        "failover can lose the last writes.",
    )
    redis_replica_timeout_s: float = Field(
        1.0,
        gt=0,
        description="Durable mode: how long a write waits for its replicas before the "
        "call fails with ReplicationTimeoutError.",
    )
    ledger_scripts: Literal["auto", "function", "eval"] = Field(
        "auto",
        description="How the ledger's Lua scripts run: 'function' loads them as one Redis "
        "function library (Redis 7+; the shared prelude is built once, not on every call), "
        "'eval' sends each by EVALSHA, 'auto' takes 'function' where the server allows it.",
    )
    broker_url: str | None = Field(
        None,
        description="Celery's broker for the attempts' messages. Unset: the ledger's Redis "
        "(GRIDQUEUE_REDIS_URL). amqp://user:password@host:5672/vhost: RabbitMQ (the "
        "ledger stays on Redis).",
    )
    broker_consumer_timeout_s: int = Field(
        86_400,
        gt=0,
        description="RabbitMQ only: the per-queue consumer timeout (x-consumer-timeout, "
        "RabbitMQ 3.12+); keep it above the longest attempt. Older servers ignore it: "
        "raise consumer_timeout in rabbitmq.conf instead.",
    )
    broker_management_url: str | None = Field(
        None,
        description="RabbitMQ only: its management API (http://user:password@host:15672), "
        "through which the watchdog closes the broker connections of a worker it declares "
        "dead on its heartbeat (a frozen node would hold requeued attempts in its prefetch "
        "until the AMQP heartbeat lapses). Unset: the broker URL's host and login on port "
        "15672 (https for amqps). 'off': never close connections.",
    )
    namespace: str = Field("gq", pattern=r"^[A-Za-z0-9_.-]+$", description="Ledger key prefix.")
    heartbeat_interval_s: float = Field(0.2, gt=0, description="Worker heartbeat period.")
    stale_after_s: float = Field(1.0, gt=0, description="Silence after which a worker is dead.")
    connection_signal: bool = Field(
        True,
        description="Declare a worker dead at once when its main process is gone: its "
        "heartbeat is late by more than one interval and its presence subscription has "
        "closed (the kernel closes a dead process's sockets). False leaves only the "
        "heartbeat's stale_after_s (e.g. behind a proxy that hides client connections).",
    )
    watchdog_tick_s: float = Field(0.1, gt=0, description="Watchdog loop period.")
    watchdog_lease_s: float = Field(2.0, gt=0, description="Leader lease; a standby waits it out.")
    dispatch_grace_s: float = Field(
        2.0, gt=0, description="How long a publish may take before the watchdog re-sends it."
    )
    payload_max_bytes: int = Field(1_048_576, gt=0, description="Largest JSON payload accepted.")
    stream_max_chunks: int = Field(
        100_000, gt=0, description="Most chunks one job's output stream holds (ctx.emit)."
    )
    stream_max_bytes: int = Field(
        16 * 1_048_576, gt=0, description="Most bytes (encoded JSON) one job's stream holds."
    )
    stream_chunk_max_bytes: int = Field(
        65_536, gt=0, description="Largest chunk ctx.emit() takes, as encoded JSON."
    )
    checkpoint_max_bytes: int = Field(
        65_536, gt=0, description="Largest resume state ctx.checkpoint() takes, as JSON."
    )
    events_max_len: int = Field(100_000, gt=0, description="Approximate cap of the event stream.")
    job_retention_s: int = Field(7 * 86_400, gt=0, description="How long ended jobs are kept.")
    workloads_file: Path = Field(
        DEFAULT_WORKLOADS_FILE,
        description="Workload classes; default the classes shipped in the package "
        "(gridqueue/config/workloads.toml).",
    )
    health_interval_s: float = Field(0.2, gt=0, description="How often the GPU probe reads.")
    health_refresh_s: float = Field(
        5.0,
        gt=0,
        description="How often a heartbeat carries the GPU health document when nothing "
        "judged in it changed (a change goes on the next beat): the age of the GPU "
        "telemetry (memory, utilization, temperature, power) that the dashboard shows.",
    )
    health_probe_timeout_s: float = Field(
        2.0, gt=0, description="A probe read (every NVML call in it) slower than this is hung."
    )
    health_degraded_persist_s: float = Field(
        5.0, ge=0, description="How long a degraded reading must last before it counts."
    )
    health_gpu_unresponsive_after_s: float = Field(
        3.0,
        gt=0,
        description="A GPU whose every NVML call fails (NVMLError_Unknown, NoPermission) "
        "for this long is unhealthy; a single failed read is not.",
    )
    health_temperature_limit_c: float = Field(87.0, description="Hotter than this is degraded.")
    health_temperature_hysteresis_c: float = Field(
        5.0, ge=0, description="A hot GPU is cool again only this far below the limit."
    )
    health_xid_unhealthy: list[int] = Field(
        default=[48, 64, 74, 79, 95, 119, 120, 140],
        description="Xid codes that quarantine a node and requeue its work now.",
    )
    health_xid_degraded: list[int] = Field(
        default=[63, 92, 94], description="Xid codes that drain a node."
    )
    health_xid_ignored: list[int] = Field(
        default=[13, 31, 43, 45, 68, 109],
        description="Application-level Xid codes: counted, not node health.",
    )
    probation_base_s: float = Field(
        10.0, ge=0, description="Probation before a recovered or returning node gets work."
    )
    probation_cap_s: float = Field(600.0, ge=0, description="Longest probation.")
    probation_window_s: float = Field(
        900.0, gt=0, description="Failures this close together double the probation."
    )
    stall_quarantine_after: int = Field(
        3, ge=1, description="Stalls on one node within stall_window_s that quarantine it."
    )
    stall_window_s: float = Field(600.0, gt=0, description="Window for counting a node's stalls.")
    celery_events: bool = Field(
        True,
        description="Celery task events and event heartbeats, so Flower and `celery events` "
        "see the fleet; false turns them off (a little less broker traffic per attempt).",
    )
    dashboard_token: SecretStr | None = Field(
        None,
        description="Bearer token for the dashboard's actions (quarantine, drain, release, "
        "cancel, replay). Without one the dashboard is read-only.",
    )
    worker_metrics_retention_s: float = Field(
        3600.0,
        gt=0,
        description="Workers gone longer than this drop out of the per-worker metrics.",
    )
    log_format: Literal["json", "console"] = "json"
    log_level: str = "INFO"

    @property
    def redis_target(self) -> RedisTarget:
        """Where the ledger and the broker live (validated with the settings)."""
        return RedisTarget(
            self.redis_url,
            self.redis_sentinel_master,
            None
            if self.redis_sentinel_password is None
            else self.redis_sentinel_password.get_secret_value(),
        )

    @property
    def broker(self) -> Broker:
        """What carries the attempts' Celery messages (validated with the settings)."""
        from gridqueue.brokers import broker_for

        return broker_for(self)

    @model_validator(mode="after")
    def _broker_url_is_known(self) -> Settings:
        from gridqueue.brokers import broker_url_problem, management_url_problem

        problem = broker_url_problem(self.broker_url) or management_url_problem(
            self.broker_management_url
        )
        if problem is not None:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _redis_target_is_complete(self) -> Settings:
        self.redis_target  # noqa: B018 - raises, with what to set, on a partial target
        return self

    @model_validator(mode="after")
    def _liveness_is_coherent(self) -> Settings:
        if self.stale_after_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                "GRIDQUEUE_STALE_AFTER_S must be at least twice GRIDQUEUE_HEARTBEAT_INTERVAL_S, "
                "or one late heartbeat declares a healthy worker dead"
            )
        if self.watchdog_lease_s <= 2 * self.watchdog_tick_s:
            raise ValueError(
                "GRIDQUEUE_WATCHDOG_LEASE_S must exceed twice GRIDQUEUE_WATCHDOG_TICK_S, "
                "or the leader loses its lease between two ticks"
            )
        return self
