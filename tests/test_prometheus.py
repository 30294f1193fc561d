"""The Prometheus configuration and alert rules in ops/prometheus are valid, and each alert
fires on its trouble and only then (promtool's unit tests with synthetic series)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS = Path(__file__).resolve().parent.parent / "ops" / "prometheus"

promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool missing: `bash ops/services.sh tools prometheus` installs it")


def run(*args: str) -> str:
    done = subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@promtool
def test_config_and_rules_are_valid() -> None:
    out = run("check", "config", "prometheus.yml")
    assert "SUCCESS" in out
    run("check", "rules", "alerts.yml")


@promtool
def test_alerts_fire_on_their_trouble_only() -> None:
    assert "SUCCESS" in run("test", "rules", "alerts_test.yml")


@promtool
def test_every_alert_has_a_unit_test() -> None:
    rules = (PROMETHEUS / "alerts.yml").read_text()
    tests = (PROMETHEUS / "alerts_test.yml").read_text()
    alerts = {line.split(":", 1)[1].strip() for line in rules.splitlines()
              if line.strip().startswith("- alert:")}
    tested = {line.split(":", 1)[1].strip() for line in tests.splitlines()
              if line.strip().startswith("alertname:")}
    assert alerts and alerts == tested, alerts ^ tested
