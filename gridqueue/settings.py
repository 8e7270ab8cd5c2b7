"""Configuration: every knob, read from ``GRIDQUEUE_*`` environment variables.

Defaults are the safe production values from the design: a 200 ms heartbeat, a worker is
dead after 1 s of silence, the watchdog ticks every 100 ms under a 2 s leader lease.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    """gridqueue settings; each field maps to ``GRIDQUEUE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="GRIDQUEUE_", extra="ignore")

    redis_url: str = Field(
        DEFAULT_REDIS_URL,
        description="Ledger and broker. redis://[:password@]host:port/db or rediss:// for TLS.",
    )
    namespace: str = Field("gq", pattern=r"^[A-Za-z0-9_.-]+$", description="Ledger key prefix.")
    heartbeat_interval_s: float = Field(0.2, gt=0, description="Worker heartbeat period.")
    stale_after_s: float = Field(1.0, gt=0, description="Silence after which a worker is dead.")
    watchdog_tick_s: float = Field(0.1, gt=0, description="Watchdog loop period.")
    watchdog_lease_s: float = Field(2.0, gt=0, description="Leader lease; a standby waits it out.")
    dispatch_grace_s: float = Field(
        2.0, gt=0, description="How long a publish may take before the watchdog re-sends it."
    )
    payload_max_bytes: int = Field(1_048_576, gt=0, description="Largest JSON payload accepted.")
    events_max_len: int = Field(100_000, gt=0, description="Approximate cap of the event stream.")
    job_retention_s: int = Field(7 * 86_400, gt=0, description="How long ended jobs are kept.")
    workloads_file: Path | None = Field(
        None, description="Workload classes; default config/workloads.toml of this project."
    )
    log_format: Literal["json", "console"] = "json"
    log_level: str = "INFO"

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
