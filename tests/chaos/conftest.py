"""Chaos tier settings: a test-only workload class with a short stall timeout."""

from __future__ import annotations

from pathlib import Path

import pytest

from gridqueue.workloads import DEFAULT_WORKLOADS_FILE


@pytest.fixture(autouse=True)
def chaos_workloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "workloads.toml"
    path.write_text(
        DEFAULT_WORKLOADS_FILE.read_text()
        + "\n[quick_stall]\nidempotent = true\nmax_attempts = 3\nstall_timeout_s = 1.5\n"
        + "liveness_timeout_s = 2.0\ndefault_deadline_s = 60.0\n"
    )
    monkeypatch.setenv("GRIDQUEUE_WORKLOADS_FILE", str(path))
    return path
