"""The NVML probe in real processes, on fake GPUs: ``scripts/gpu_check.py`` end to end, a
real ``gridqueue worker --probe nvml`` whose GPU offers no Xid events (a monitoring gap the
dashboard, the API and ``gridqueue status`` show without judging the GPU), and a worker
on a machine without the NVML library."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    # Starlette's TestClient prefers httpx2 and warns on import when it finds httpx.
    warnings.filterwarnings("ignore", "Using `httpx`", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

from gridqueue.ledger import Ledger
from gridqueue.monitor.views import FleetView
from gridqueue.monitor.web import create_app
from gridqueue.settings import Settings
from tests.fakes.fake_nvml import SPEC_ENV
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
# Generous: a worker starts in seconds, but the machine running the tests may be busy.
SCRIPT_TIMEOUT_S = 240


def gpu_check(spec: dict[str, Any], seconds: float = 2.0) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--seconds",
            str(seconds),
            "--json",
            "--fake-nvml",
            json.dumps(spec),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )
    return done.returncode, json.loads(done.stdout), done.stderr


def test_gpu_check_on_healthy_gpus_passes_and_reports_them() -> None:
    # gpu0 offers no Xid events: a warning, not a failure.
    code, report, stderr = gpu_check({"gpus": [{"events_supported": False}, {}]})
    assert code == 0, (report, stderr)
    assert report["ok"] is True and report["problems"] == []
    assert report["probe"]["kind"] == "nvml" and report["probe"]["fake"] is True
    assert report["probe"]["driver_version"] == "575.57.08"
    gpus = report["gpus"]
    assert [g["index"] for g in gpus] == [0, 1]
    assert gpus[1]["uuid"] == "GPU-00000000-0000-0000-0000-000000000001"
    assert gpus[1]["name"] == "NVIDIA H100 80GB HBM3"
    assert gpus[1]["memory_total_bytes"] == 80 * 2**30
    assert gpus[1]["driver_version"] == "575.57.08"
    assert gpus[0]["event_types"] == []
    assert gpus[1]["event_types"] == ["xid_critical_error", "double_bit_ecc_error"]
    assert gpus[1]["reading"]["temperature_c"] == 45.0
    health = report["health"]
    assert health["verdict"] == health["worst_verdict"] == "HEALTHY"
    assert health["reads"] >= 2
    assert health["notices"] == ["no_xid_events:gpu0"]
    assert any(w.startswith("gpu0: no Xid events") for w in report["warnings"])
    worker = report["worker"]
    assert worker["registered"] is True
    assert (worker["probe"], worker["verdict"], worker["gpus"]) == ("nvml", "HEALTHY", 2)
    assert worker["notices"] == ["no_xid_events:gpu0"]
    assert worker["note"] == "nvml: 2 GPU(s), driver 575.57.08"
    assert worker["heartbeat_advanced_ms"] > 0
    assert worker["exit_code"] == 0  # a warm shutdown


def test_gpu_check_fails_on_a_lost_gpu() -> None:
    code, report, stderr = gpu_check({"gpus": [{}, {"lost": True}]})
    assert code == 1, (report, stderr)
    assert report["ok"] is False
    assert report["health"]["worst_verdict"] == "UNHEALTHY"
    assert "gpu_lost:gpu1" in report["health"]["reasons_seen"]
    assert any(
        p.startswith("GPU health was UNHEALTHY") and "gpu_lost:gpu1" in p
        for p in (report["problems"])
    )
    # The worker itself ran, and said the same.
    assert report["worker"]["verdict"] == "UNHEALTHY"
    assert "gpu_lost:gpu1" in report["worker"]["reasons"]


def test_gpu_check_fails_on_a_gpu_that_stopped_answering() -> None:
    # Longer than the default bound (3 s) a GPU may stay silent for.
    code, report, _ = gpu_check({"gpus": [{}, {"errors": {"*": "Unknown"}}]}, seconds=5.0)
    assert code == 1
    assert "gpu_unresponsive:gpu1" in report["health"]["reasons_seen"]
    assert report["gpus"][1]["reading"]["read_error"] == "NVMLError_Unknown: Unknown Error"


def test_gpu_check_without_nvml_says_so_and_runs_no_worker() -> None:
    code, report, _ = gpu_check({"library_found": False})
    assert code == 1
    assert report["problems"] == [
        "NVML missing: probe nvml: NVML unavailable (NVMLError_LibraryNotFound: NVML Shared "
        "Library Not Found); install the NVIDIA driver, or use probe kind 'simulated' (or 'auto')"
    ]
    assert "worker" not in report and "gpus" not in report


def test_gpu_check_text_output_ends_with_the_outcome() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "1", "--fake-nvml", '{"library_found": false}'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    assert lines[-2].startswith("PROBLEM: NVML missing: probe nvml: NVML unavailable")
    assert lines[-1] == "FAILED: see the problems above"


# -- a real worker on fake GPUs --------------------------------------------------------------


def start_fake_gpu_worker(
    redis_url: str, name: str, spec: dict[str, Any], probe: str = "nvml"
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakes.nvml_gridqueue",
            "worker",
            "--name",
            name,
            "--models",
            "sim-llm",
            "--probe",
            probe,
            "--concurrency",
            "1",
        ],
        cwd=ROOT,
        env={**os.environ, "GRIDQUEUE_REDIS_URL": redis_url, SPEC_ENV: json.dumps(spec)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.fixture
def gap_worker(redis_url: str, ledger: Ledger) -> Iterator[str]:
    """A worker whose gpu0 offers no Xid events, on the NVML probe."""
    process = start_fake_gpu_worker(redis_url, "w1", {"gpus": [{"events_supported": False}, {}]})
    try:
        wait_for(
            lambda: (w := ledger.worker("w1")) is not None and w.health is not None,
            timeout_s=120,
        )
        yield "w1"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


def test_a_gpu_without_xid_events_is_shown_to_operators_but_not_judged(
    gap_worker: str, ledger: Ledger, settings: Settings, redis_url: str
) -> None:
    record = ledger.worker(gap_worker)
    assert record is not None and record.health is not None
    assert record.probe == "nvml"
    assert record.verdict == "HEALTHY" and record.health["reasons"] == []
    assert record.health["notices"] == ["no_xid_events:gpu0"]
    assert record.health["gpus"][0]["xid_events_missing"] == "the GPU does not offer them"

    (summary,) = FleetView(ledger).workers()
    assert summary["notices"] == ["no_xid_events:gpu0"]
    assert summary["verdict"] == "HEALTHY"

    with TestClient(create_app(settings, ledger=ledger)) as client:
        (api,) = client.get("/api/workers").json()
        assert api["notices"] == ["no_xid_events:gpu0"]
        assert api["gpus"][0]["xid_events_missing"] == "the GPU does not offer them"
        assert client.get(f"/api/workers/{gap_worker}").json()["notices"] == ["no_xid_events:gpu0"]
        table = client.get("/workers").text
        assert "no_xid_events:gpu0" in table
        page = client.get(f"/workers/{gap_worker}").text
        assert "Monitoring gaps" in page and "no_xid_events:gpu0" in page
        assert "no Xid events: the GPU does not offer them" in page

    status = subprocess.run(
        [sys.executable, "-m", "gridqueue.cli", "status", "--redis", redis_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "COLUMNS": "250"},
    )
    row = next(line for line in status.stdout.splitlines() if gap_worker in line)
    assert "HEALTHY" in row and "no_xid_events:gpu0" in row


def test_a_worker_with_probe_nvml_and_no_nvml_library_exits_with_one_clear_line(
    redis_url: str,
) -> None:
    process = start_fake_gpu_worker(redis_url, "w1", {"library_found": False})
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert stderr.strip().splitlines() == [
        "error: probe nvml: NVML unavailable (NVMLError_LibraryNotFound: NVML Shared Library "
        "Not Found); install the NVIDIA driver, or use probe kind 'simulated' (or 'auto')"
    ]
