"""Settings from the environment: typed, checked, with clear errors."""

from __future__ import annotations

import pytest

from ops.settings import Settings, SettingsError


def test_values_are_typed() -> None:
    s = Settings.from_env({"PAYONCE_PARTITIONS": "8", "PAYONCE_PSP_LATENCY_MS": "50-250",
                           "PAYONCE_PSP_ERROR_RATE": "0.1", "PAYONCE_EDGE_PORT": "9000",
                           "PAYONCE_AMQP_PREFIX": "x", "PAYONCE_PSP_TIMEOUT_S": "3"})
    assert s.partitions == 8
    assert s.psp_latency_ms == (50, 250)
    assert s.psp_error_rate == 0.1
    assert s.edge_port == 9000
    assert s.amqp_prefix == "x"
    assert s.psp_timeout_s == 3.0
    assert Settings.from_env({"PAYONCE_PSP_LATENCY_MS": "20"}).psp_latency_ms == (20, 20)


def test_defaults_without_environment() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.idempotency_ttl_s == 24 * 3600
    assert s.max_body_bytes == 64 * 1024


@pytest.mark.parametrize("env", [
    {"PAYONCE_PARTITIONS": "many"},
    {"PAYONCE_PARTITIONS": "0"},
    {"PAYONCE_PSP_LATENCY_MS": "400-100"},
    {"PAYONCE_PSP_ERROR_RATE": "2"},
    {"PAYONCE_PSP_MAX_TRIES": "0"},
    {"PAYONCE_PREFETCH": "0"},
    {"PAYONCE_DB_TIMEOUT_S": "0"},
    {"PAYONCE_CAPTURE_WINDOW_S": "0"},
])
def test_bad_values_are_named(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)
    assert "PAYONCE_" in str(raised.value)


@pytest.mark.parametrize(("env", "named"), [
    # A lease shorter than a PSP call and a pause: a live processor would lose its attempt.
    ({"PAYONCE_PSP_TIMEOUT_S": "30"}, "PAYONCE_PSP_LEASE_S"),
    # A lock shorter than a request: a live request would lose its key.
    ({"PAYONCE_IDEMPOTENCY_LOCK_MS": "5000"}, "PAYONCE_IDEMPOTENCY_LOCK_MS"),
    # A request too short to publish once and read the database twice.
    ({"PAYONCE_PUBLISH_TIMEOUT_S": "9"}, "PAYONCE_REQUEST_TIMEOUT_S"),
    ({"PAYONCE_DB_TIMEOUT_S": "4"}, "PAYONCE_REQUEST_TIMEOUT_S"),
    # Results reported again before a processor could even have lost the attempt.
    ({"PAYONCE_PSP_REPORT_TIMEOUT_S": "10"}, "PAYONCE_PSP_REPORT_TIMEOUT_S"),
    # A capture window the sweeper cannot keep.
    ({"PAYONCE_CAPTURE_WINDOW_S": "0.5"}, "PAYONCE_CAPTURE_WINDOW_S"),
])
def test_settings_that_cannot_work_together_fail_at_start(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_the_pause_between_psp_tries_fits_in_the_lease() -> None:
    assert Settings().psp_max_pause_s == 5.0
    tight = Settings.from_env({"PAYONCE_PSP_TIMEOUT_S": "2", "PAYONCE_PSP_LEASE_S": "3"})
    assert tight.psp_max_pause_s == 1.0


def test_secret_is_required_to_derive_ids() -> None:
    with pytest.raises(SettingsError, match="PAYONCE_SECRET"):
        _ = Settings().secret_bytes
