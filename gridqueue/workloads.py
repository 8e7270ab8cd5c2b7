"""Workload classes: frozen descriptions of how a kind of job is retried.

The defaults ship inside the package, in ``gridqueue/config/workloads.toml``;
``GRIDQUEUE_WORKLOADS_FILE`` points at another file. A class is data only;
:mod:`gridqueue.policies` turns it into decisions.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from gridqueue.errors import ConfigError

# Package data, so that it is found by any install (wheel, editable, the Docker image).
DEFAULT_WORKLOADS_FILE = Path(
    str(resources.files("gridqueue").joinpath("config", "workloads.toml"))
)


_EXPECTED_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "bool": bool,
    "int": int,
    "float": (int, float),
    "float | None": (int, float),
}
_TYPE_NAMES: dict[type | tuple[type, ...], str] = {
    str: "a string",
    bool: "true or false",
    int: "an integer",
    (int, float): "a number",
}


@dataclass(frozen=True)
class WorkloadClass:
    """How jobs of one class are retried, bounded and prioritised."""

    name: str
    idempotent: bool
    max_attempts: int
    backoff_initial_s: float = 0.0
    backoff_max_s: float = 0.0
    backoff_multiplier: float = 2.0
    backoff_jitter_s: float = 0.0
    default_deadline_s: float | None = None
    poison_after_workers: int = 3
    wait_for_capacity: bool = False  # accept jobs while no worker can serve them now
    liveness_timeout_s: float = 2.0  # silence of the attempt's own heartbeat = stalled
    stall_timeout_s: float = 60.0  # no ctx.progress() for this long = stalled
    priority: int = 6  # kombu Redis priority step of fresh work: lower runs first
    requeue_priority: int = 0  # a failover goes ahead of fresh work
    resume: bool = False  # the next attempt gets the last checkpoint (ctx.resume)

    @property
    def liveness_interval_s(self) -> float:
        """How often a running attempt beats: four beats fit in its timeout."""
        return max(0.05, self.liveness_timeout_s / 4)

    def __post_init__(self) -> None:
        where = f"workload class {self.name!r}"
        # TOML gives each value its own type; a string where a bool belongs ("false" is
        # truthy) would silently retry non-idempotent work, so types are checked first.
        for spec in fields(self):
            value = getattr(self, spec.name)
            expected = _EXPECTED_TYPES[str(spec.type)]
            if value is None and "None" in str(spec.type):
                continue
            if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
                raise ConfigError(
                    f"{where}: {spec.name} must be {_TYPE_NAMES[expected]}, got {value!r}"
                )
        if self.max_attempts < 1:
            raise ConfigError(f"{where}: max_attempts must be >= 1")
        if self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError(f"{where}: need 0 <= backoff_initial_s <= backoff_max_s")
        if self.backoff_jitter_s < 0 or self.backoff_multiplier < 1:
            raise ConfigError(f"{where}: need backoff_jitter_s >= 0 and backoff_multiplier >= 1")
        if self.default_deadline_s is not None and self.default_deadline_s <= 0:
            raise ConfigError(f"{where}: default_deadline_s must be > 0 (or left out)")
        if self.liveness_timeout_s <= 0 or self.stall_timeout_s <= 0:
            raise ConfigError(f"{where}: liveness_timeout_s and stall_timeout_s must be > 0")
        if self.resume and not self.idempotent:
            raise ConfigError(
                f"{where}: resume = true needs idempotent = true (a non-idempotent job is "
                "never run again, so there is nothing to resume); set resume = false"
            )
        if self.poison_after_workers < 1:
            raise ConfigError(f"{where}: poison_after_workers must be >= 1")
        for name in ("priority", "requeue_priority"):
            if not 0 <= getattr(self, name) <= 9:
                raise ConfigError(f"{where}: {name} must be within 0..9")


def parse_workloads(document: dict[str, Any], source: str = "<memory>") -> dict[str, WorkloadClass]:
    allowed = {f.name for f in fields(WorkloadClass)} - {"name"}
    classes: dict[str, WorkloadClass] = {}
    for name, table in document.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of settings")
        unknown = set(table) - allowed
        if unknown:
            raise ConfigError(
                f"{source}: [{name}] has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}"
            )
        try:
            classes[name] = WorkloadClass(name=name, **table)
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"{source}: [{name}]: {exc}") from exc
    if not classes:
        raise ConfigError(f"{source}: defines no workload class")
    return classes


def load_workloads(path: Path | None = None) -> dict[str, WorkloadClass]:
    """Read the workload classes; a missing or broken file is a ConfigError."""
    path = path or DEFAULT_WORKLOADS_FILE
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"workload classes file {path} not found; set GRIDQUEUE_WORKLOADS_FILE"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read workload classes file {path} ({exc}); fix GRIDQUEUE_WORKLOADS_FILE"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_workloads(document, str(path))
