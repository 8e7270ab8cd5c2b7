"""A local fleet of real processes: ``gridqueue worker`` and ``gridqueue watchdog``.

The demo, the benchmarks and the integration tests all run the fleet this way, each
process in its own process group so that a drill can kill -9 a whole node at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from gridqueue.errors import GridQueueError
from gridqueue.ledger import Ledger
from gridqueue.states import WorkerState

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.02, what: str = ""
) -> T:
    """Poll until ``predicate()`` is truthy and return it; TimeoutError after ``timeout_s``."""
    give_up_at = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > give_up_at:
            raise TimeoutError(f"not met within {timeout_s} s: {what or predicate}")
        time.sleep(interval_s)


@dataclass
class FleetProcess:
    name: str
    kind: str  # worker | watchdog
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def children(self) -> list[int]:
        """Pids of the worker's pool children (Linux /proc)."""
        found: list[int] = []
        task_dir = Path(f"/proc/{self.pid}/task")
        with contextlib.suppress(FileNotFoundError):
            for task in task_dir.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    found += [int(p) for p in (task / "children").read_text().split()]
        return found

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)


class LocalFleet:
    def __init__(self, redis_url: str, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "GRIDQUEUE_REDIS_URL": redis_url,
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.processes: dict[str, FleetProcess] = {}

    def _spawn(
        self, name: str, kind: str, args: list[str], env: dict[str, str] | None = None
    ) -> FleetProcess:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "gridqueue.cli", *args],
                env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill -9 takes the whole node
            )
        proc = FleetProcess(name, kind, process, log_path)
        self.processes[name] = proc
        return proc

    def start_worker(
        self,
        name: str,
        models: str = "sim-llm",
        concurrency: int = 2,
        handlers: str = "workers.simulated",
        env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> FleetProcess:
        """Start a worker; ``env`` overrides this one's environment (e.g. its Redis URL)."""
        args = ["worker", "--name", name, "--models", models, "--concurrency", str(concurrency)]
        args += ["--handlers", handlers, "--loglevel", "WARNING", "--probe", "simulated"]
        return self._spawn(name, "worker", [*args, *extra_args], env)

    def start_watchdog(self, name: str = "watchdog-1") -> FleetProcess:
        return self._spawn(name, "watchdog", ["watchdog"])

    def wait_alive(self, ledger: Ledger, names: list[str], timeout_s: float = 60.0) -> None:
        """Wait until each named worker is registered ALIVE (a fresh incarnation)."""
        give_up_at = time.monotonic() + timeout_s
        while time.monotonic() < give_up_at:
            records = {w.name: w for w in ledger.workers()}
            if all(n in records and records[n].state is WorkerState.ALIVE for n in names):
                return
            for n in names:
                proc = self.processes.get(n)
                if proc is not None and not proc.alive():
                    tail = proc.log_path.read_text(errors="replace")[-3000:]
                    raise GridQueueError(f"worker {n} exited during start-up:\n{tail}")
            time.sleep(0.05)
        raise GridQueueError(f"workers {names} not ALIVE after {timeout_s} s")

    def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        """Signal the whole process group of ``name`` (a node: main process and children)."""
        self.processes[name].signal_group(signum)

    def stop(self, name: str, timeout_s: float = 10.0) -> None:
        """A warm shutdown of ``name``: it finishes what runs and takes nothing more."""
        self.stop_many([name], timeout_s)

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """Every process down now (a teardown): what runs is lost, as in a node's death."""
        self.stop_many(list(self.processes), timeout_s, warm=False)

    def stop_many(self, names: list[str], timeout_s: float = 10.0, warm: bool = True) -> None:
        """SIGCONT to each group, then SIGTERM: ``warm``, to the main process alone, as
        ``docker stop`` (or systemd with ``KillMode=mixed``) sends it, so Celery finishes the
        running attempts before it exits (its pool children take SIGTERM's default action:
        sent to the whole group, it kills them mid-attempt); else to the whole group.
        SIGKILL to any still running after ``timeout_s``, then to whatever is left in their
        groups. All are signalled first, then waited for, so their shutdowns overlap instead
        of adding up."""
        stopping = [self.processes.pop(name) for name in names]
        for proc in stopping:
            proc.signal_group(signal.SIGCONT)
            if warm:
                with contextlib.suppress(ProcessLookupError):
                    proc.process.send_signal(signal.SIGTERM)
            else:
                proc.signal_group(signal.SIGTERM)
        for proc in stopping:
            try:
                proc.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.signal_group(signal.SIGKILL)
                proc.process.wait(timeout=timeout_s)
            proc.signal_group(signal.SIGKILL)  # leftovers in the group, if any
