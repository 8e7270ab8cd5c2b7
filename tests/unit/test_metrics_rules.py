"""The Prometheus files shipped in config/prometheus, checked by promtool itself: the
scrape config and the alert rules are valid, and each alert fires on the series it should
(alerts_test.yml). Without promtool these tests are skipped, and say so."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "config" / "prometheus"


def promtool(*args: str) -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip(
            "promtool is not installed (Debian: apt-get install prometheus), so the "
            "Prometheus config and alert rules were not checked"
        )
    # Relative paths: the config names its rule files, and the tests theirs, from there.
    done = subprocess.run(
        [binary, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_the_alert_rules_are_valid() -> None:
    output = promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in output


def test_the_scrape_config_is_valid() -> None:
    output = promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 1 rule files found" in output


def test_each_alert_fires_on_the_series_it_should() -> None:
    output = promtool("test", "rules", "alerts_test.yml")
    assert "SUCCESS" in output


def test_every_alert_has_a_unit_test() -> None:
    alerts = set(_names(PROMETHEUS_DIR / "alerts.yml", "alert:"))
    tested = set(_names(PROMETHEUS_DIR / "alerts_test.yml", "alertname:"))
    assert alerts, "no alerts found in alerts.yml"
    assert alerts - tested == set()


def _names(path: Path, key: str) -> list[str]:
    return [
        line.split(key, 1)[1].strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip().startswith(("- " + key, key))
    ]
