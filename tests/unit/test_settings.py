"""Configuration (app.settings, app.sandbox.settings): zero-configuration defaults, environment
overrides, and errors that name the PAYDISPATCH_* variable to fix."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from app.errors import ConfigurationError, PaydispatchError
from app.sandbox.settings import SandboxConfigError, load_sandbox_settings
from app.settings import load_settings
from app.store.engine import driver_dsn, engine_url


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PAYDISPATCH_* variable from the developer's shell or CI leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("PAYDISPATCH_"):
            monkeypatch.delenv(name)


def config_error(**env: str) -> str:
    """The ConfigurationError message for these PAYDISPATCH_* variables."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(f"PAYDISPATCH_{name}", value)
        with pytest.raises(ConfigurationError) as raised:
            load_settings()
    return str(raised.value)


# --- replica settings -----------------------------------------------------------------------


def test_zero_configuration_gives_working_local_defaults() -> None:
    settings = load_settings()

    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/paydispatch"
    assert settings.etcd_endpoints == ("127.0.0.1:2379",)
    assert settings.provider_url == "http://127.0.0.1:8081"
    assert settings.lease_ttl == 2
    assert settings.api_keys == ()
    assert settings.public_url == "http://127.0.0.1:8080"
    assert settings.election_prefix == "/paydispatch/default/election/"


def test_the_default_node_id_is_unique_per_process() -> None:
    assert load_settings().node_id.endswith(f"-{os.getpid()}")


def test_environment_variables_override_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYDISPATCH_LEASE_TTL", "5")
    monkeypatch.setenv("PAYDISPATCH_NODE_ID", "replica-1")
    monkeypatch.setenv("PAYDISPATCH_ETCD_ENDPOINTS", " etcd-1:2379, etcd-2:2379 ,,etcd-3:2379")
    monkeypatch.setenv("PAYDISPATCH_API_KEYS", "key-a,key-b")
    monkeypatch.setenv("PAYDISPATCH_ALLOW_NO_AUTH", "true")

    settings = load_settings()

    assert settings.lease_ttl == 5
    assert settings.node_id == "replica-1"
    assert settings.etcd_endpoints == ("etcd-1:2379", "etcd-2:2379", "etcd-3:2379")
    assert settings.api_keys == ("key-a", "key-b")
    assert settings.allow_no_auth is True


def test_flags_override_the_environment_and_none_means_not_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAYDISPATCH_PORT", "9000")
    monkeypatch.setenv("PAYDISPATCH_HOST", "0.0.0.0")

    settings = load_settings(port=9100, host=None)

    assert settings.port == 9100
    assert settings.host == "0.0.0.0"


def test_the_database_url_gets_the_asyncpg_driver_and_keeps_a_unix_socket_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAYDISPATCH_DATABASE_URL", "postgresql://app@/payments?host=/run/pg")

    settings = load_settings()

    assert engine_url(settings.database_url) == "postgresql+asyncpg://app@/payments?host=/run/pg"
    assert driver_dsn(settings.database_url) == "postgresql://app@/payments?host=/run/pg"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LEASE_TTL", "1"),
        ("LEASE_TTL", "two"),
        ("LEASE_TTL", "61"),
        ("PORT", "70000"),
        ("DATABASE_URL", "mysql://root@db/payments"),
        ("DATABASE_URL", "127.0.0.1:5432"),
        ("CLUSTER_NAME", "has spaces"),
        ("NOTIFY_CHANNEL", "Bad-Channel"),
        ("ALLOW_NO_AUTH", "maybe"),
        ("DISPATCH_BATCH_SIZE", "0"),
        ("DB_POOL_WARM", "-1"),
        ("DB_POOL_WARM", "eight"),
        ("INGEST_OUTAGE_WAIT", "-1"),
        ("INGEST_OUTAGE_WAIT", "61"),
        ("INGEST_OUTAGE_WAIT", "nan"),
        ("DISPATCH_INITIAL_CONCURRENCY", "0"),
        ("DISPATCH_INITIAL_CONCURRENCY", "sixteen"),
        ("DISPATCH_INITIAL_CONCURRENCY", "1001"),
        ("DISPATCH_RAMP_SECONDS", "-1"),
        ("DISPATCH_RAMP_SECONDS", "nan"),
        ("DISPATCH_RAMP_SECONDS", "inf"),
        ("DISPATCH_RAMP_SECONDS", "601"),
        ("PROVIDER_TIMEOUT", "0"),
        ("PROVIDER_URL", "ftp://provider.example"),
        ("PROVIDER_URL", "provider.example:443"),
        ("PROVIDER_URL", "https://"),
        ("PROVIDER_URL", "https://provider.example/?account=1"),
        ("PROVIDER_URL", "https://provider.example:99999"),
        ("PROVIDER_URL", "https://user:secret@provider.example"),
        ("PROVIDER_URL", "https://provider.example/a path"),
        ("MAX_BODY_BYTES", "100"),
    ],
)
def test_a_bad_value_is_a_configuration_error_naming_its_variable(
    variable: str, value: str
) -> None:
    message = config_error(**{variable: value})

    assert f"PAYDISPATCH_{variable}:" in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # Each of these is written into DDL by `paydispatch migrate`: a quote, a space, a
        # semicolon or a comment marker must never get that far.
        ("FENCE_NAME", "payments'); DROP TABLE payments; --"),
        ("FENCE_NAME", "pay ments"),
        ("FENCE_NAME", "Payments"),
        ("FENCE_NAME", ""),
        ("FENCE_NAME", "x" * 64),
        ("NOTIFY_CHANNEL", "wake'; NOTIFY x; --"),
        ("NOTIFY_CHANNEL", "wake-up"),
        ("REPLICA_ROLE", "replica; DROP ROLE postgres"),
        ("REPLICA_ROLE", '"Replica"'),
        ("REPLICA_ROLE", "pg_monitor"),
    ],
)
def test_names_that_reach_ddl_are_refused_unless_strictly_plain(variable: str, value: str) -> None:
    message = config_error(**{variable: value})

    assert f"PAYDISPATCH_{variable}:" in message


@pytest.mark.parametrize("name", ["payments", "payments-eu.2", "shard_7"])
def test_plain_fence_names_are_accepted(name: str) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PAYDISPATCH_FENCE_NAME", name)
        assert load_settings().fence_name == name


def test_every_bad_variable_is_named_in_one_error() -> None:
    message = config_error(PORT="-1", LEASE_TTL="0", DB_POOL_SIZE="0")

    assert "PAYDISPATCH_PORT" in message
    assert "PAYDISPATCH_LEASE_TTL" in message
    assert "PAYDISPATCH_DB_POOL_SIZE" in message


def test_a_safety_margin_of_half_the_lease_or_more_is_refused() -> None:
    message = config_error(LEASE_TTL="4", LEASE_SAFETY_MARGIN="2")

    assert "lease_safety_margin (2.0s) must be under half the lease_ttl (4s)" in message


def test_a_cross_field_error_names_the_variables_involved() -> None:
    message = config_error(LEASE_TTL="4", LEASE_SAFETY_MARGIN="2")

    assert "PAYDISPATCH_LEASE_SAFETY_MARGIN" in message


def test_an_etcd_endpoint_list_without_any_endpoint_is_refused() -> None:
    message = config_error(ETCD_ENDPOINTS=" , ")

    assert "etcd_endpoints must name at least one host:port" in message


def test_the_configuration_error_is_a_paydispatch_error_saying_what_to_fix() -> None:
    assert issubclass(ConfigurationError, PaydispatchError)
    assert "PAYDISPATCH_" in str(ConfigurationError())


def test_settings_cannot_be_changed_once_built() -> None:
    settings = load_settings()

    with pytest.raises(ValidationError):
        settings.lease_ttl = 30  # type: ignore[misc]


# --- stand-in provider settings -------------------------------------------------------------


def test_the_provider_runs_fault_free_with_zero_configuration() -> None:
    settings = load_sandbox_settings()

    assert settings.public_url == "http://127.0.0.1:8081"
    assert (settings.error_rate, settings.drop_rate, settings.decline_rate) == (0.0, 0.0, 0.0)
    assert settings.decline_amounts == ()
    assert settings.seed is None


def test_provider_variables_override_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYDISPATCH_PROVIDER_ERROR_RATE", "0.25")
    monkeypatch.setenv("PAYDISPATCH_PROVIDER_DECLINE_AMOUNTS", "13, 666")
    monkeypatch.setenv("PAYDISPATCH_PROVIDER_SEED", "7")

    settings = load_sandbox_settings(port=0)

    assert settings.error_rate == 0.25
    assert settings.decline_amounts == (13, 666)
    assert settings.seed == 7
    assert settings.port == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ERROR_RATE", "1.5"),
        ("DROP_RATE", "-0.1"),
        ("PORT", "65536"),
        ("DECLINE_AMOUNTS", "13,thirteen"),
        ("HANG_SECONDS", "0"),
    ],
)
def test_a_bad_provider_value_is_a_sandbox_config_error_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(f"PAYDISPATCH_PROVIDER_{variable}", value)

    with pytest.raises(SandboxConfigError, match=f"PAYDISPATCH_PROVIDER_{variable}"):
        load_sandbox_settings()


def test_a_latency_range_upside_down_is_refused() -> None:
    with pytest.raises(SandboxConfigError, match=r"latency_ms_max \(1.0\) must not be below"):
        load_sandbox_settings(latency_ms_min=5, latency_ms_max=1)


def test_replica_and_provider_never_read_each_others_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAYDISPATCH_PORT", "9000")
    monkeypatch.setenv("PAYDISPATCH_PROVIDER_PORT", "9001")

    assert load_settings().port == 9000
    assert load_sandbox_settings().port == 9001
