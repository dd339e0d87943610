"""All configuration in one frozen object, read from ``PAYDISPATCH_*`` environment variables.

Built once in the CLI (flags override the environment) and passed down explicitly; nothing
else in the package reads the environment.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.errors import ConfigurationError

ENV_PREFIX = "PAYDISPATCH_"

# Names that `paydispatch migrate` writes into DDL (trigger arguments, GRANT statements), where
# bind parameters are not possible: nothing but these characters may ever reach it. Checked
# here, before any command runs, and again by the migrations themselves.
FENCE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
NOTIFY_CHANNEL_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"
# An unquoted Postgres identifier (and not "pg_…": reserved for the system's own roles).
ROLE_NAME_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


CsvTuple = Annotated[tuple[str, ...], NoDecode]


class Settings(BaseSettings):
    """Settings of one replica (API, election, dispatcher). Every field is overridable by the
    environment variable ``PAYDISPATCH_<FIELD NAME IN UPPER CASE>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # --- where things are -------------------------------------------------------------
    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/paydispatch",
        description="Postgres URL, plain postgresql:// form; the Unix-socket form "
        "postgresql://user@/db?host=/dir works too. The app picks the driver itself.",
    )
    etcd_endpoints: CsvTuple = Field(
        ("127.0.0.1:2379",),
        description="Comma-separated etcd client endpoints host:port; all are used for failover.",
    )
    provider_url: str = Field(
        "http://127.0.0.1:8081", description="Base URL of the payment provider API."
    )
    node_id: str = Field(
        default_factory=_default_node_id,
        description="This replica's name in leadership records and the attempts audit trail.",
    )
    host: str = Field("127.0.0.1", description="Address the HTTP API listens on.")
    port: int = Field(8080, ge=0, le=65535, description="Port the HTTP API listens on.")
    advertise_url: str = Field(
        "",
        description="URL other replicas and operators use to reach this one; "
        "defaults to http://HOST:PORT.",
    )
    api_keys: CsvTuple = Field(
        (), description="Comma-separated bearer tokens accepted on /v1/* (required)."
    )
    admin_api_keys: CsvTuple = Field(
        (), description="Comma-separated bearer tokens for /v1/admin/* (and all of /v1/*)."
    )
    allow_no_auth: bool = Field(
        False,
        description="Serve /v1/* without authentication when no keys are configured. Off by "
        "default: without keys, serve refuses to start.",
    )

    # --- leadership ---------------------------------------------------------------------
    lease_ttl: int = Field(
        2, ge=2, le=60, description="etcd lease TTL in seconds (etcd's minimum is 2)."
    )
    lease_safety_margin: float = Field(
        0.5,
        ge=0.05,
        description="Seconds before the lease could expire at which the leader stops acting.",
    )
    cluster_name: str = Field(
        "default", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Election namespace in etcd."
    )
    etcd_timeout: float = Field(
        1.0, gt=0, description="Upper bound in seconds for one etcd call made by a follower."
    )
    fast_failover: bool = Field(
        True,
        description="Followers take over from a crashed leader before its lease expires, "
        "on two signals: its Postgres liveness lock released and its address refusing "
        "connections (README 'Fast crash detection').",
    )
    fast_failover_min_interval: float = Field(
        5.0,
        ge=0,
        description="Seconds a replica waits after one fast takeover before it may make "
        "another; meanwhile crashes go the lease path.",
    )

    # --- etcd security (see README "etcd with TLS and auth") ----------------------------
    etcd_ca_file: Path | None = Field(
        None,
        description="PEM file with the CA certificate(s) that signed the etcd members' "
        "server certificates. Setting it turns TLS on; https:// endpoints require it.",
    )
    etcd_cert_file: Path | None = Field(
        None,
        description="PEM client certificate for etcd's --client-cert-auth; goes with "
        "etcd_key_file and needs etcd_ca_file.",
    )
    etcd_key_file: Path | None = Field(
        None, description="PEM private key of etcd_cert_file (unencrypted)."
    )
    etcd_username: str | None = Field(
        None, description="etcd user to authenticate as (etcd auth enabled); needs etcd_password."
    )
    etcd_password: SecretStr | None = Field(
        None, description="Password of etcd_username (never logged or shown)."
    )

    # --- database -----------------------------------------------------------------------
    fence_name: str = Field(
        "payments",
        pattern=FENCE_NAME_PATTERN,
        description="Name of the leader_fence row guarding the payments queue (lower-case "
        "letters, digits, '_', '.', '-'); must be the name the schema's triggers enforce.",
    )
    notify_channel: str = Field(
        "paydispatch_payments",
        pattern=NOTIFY_CHANNEL_PATTERN,
        description="Postgres LISTEN/NOTIFY channel woken on every new payment.",
    )
    replica_role: str = Field(
        "paydispatch_replica",
        pattern=ROLE_NAME_PATTERN,
        description="Least-privilege Postgres role replicas log in as members of; "
        "`paydispatch migrate` (run as the schema owner) creates it if missing and sets its "
        "grants.",
    )
    db_pool_size: int = Field(10, ge=1, description="Connections in the API's pool.")
    db_pool_warm: int = Field(
        8,
        ge=0,
        description="Ingest connections opened at start-up and kept open (topped up after "
        "a Postgres restart), so that a burst finds them ready instead of opening "
        "connections while a failover keeps the CPUs busy; at most db_pool_size, 0 opens "
        "them only on demand.",
    )
    db_timeout: float = Field(
        3.0, gt=0, description="Seconds to wait for a connection or a statement."
    )
    readyz_timeout: float = Field(1.0, gt=0, description="Seconds /readyz waits for Postgres.")
    max_body_bytes: int = Field(
        16 * 1024, ge=1024, description="Largest accepted request body in bytes (else 413)."
    )
    retry_after_seconds: int = Field(
        2, ge=1, description="Retry-After sent with 503 while Postgres is unavailable."
    )
    ingest_outage_wait: float = Field(
        1.5,
        ge=0,
        le=60,
        description="Seconds an ingest request waits for Postgres to answer again (a "
        "restart, a failover of the database) before it is answered 503; the insert is "
        "then tried again under the same Idempotency-Key. 0 answers 503 at once.",
    )

    # --- dispatcher ---------------------------------------------------------------------
    dispatch_batch_size: int = Field(128, ge=1, le=1000, description="Payments claimed at once.")
    dispatch_concurrency: int = Field(
        256,
        ge=1,
        le=1000,
        description="Payments in flight (claimed, not yet recorded) at once, once a term "
        "has ramped up.",
    )
    dispatch_initial_concurrency: int = Field(
        16,
        ge=1,
        le=1000,
        description="Payments in flight when a term starts (slow start); at or above "
        "dispatch_concurrency: no ramp.",
    )
    dispatch_ramp_seconds: float = Field(
        4.0,
        ge=0,
        le=600,
        description="Seconds a term takes to ramp from dispatch_initial_concurrency up to "
        "dispatch_concurrency (exponentially; 0: no ramp).",
    )
    dispatch_poll_interval: float = Field(
        0.5, gt=0, description="Seconds between queue polls when no NOTIFY arrives."
    )
    provider_timeout: float = Field(
        5.0, gt=0, description="Upper bound in seconds for one provider call."
    )
    max_attempts: int = Field(
        20, ge=1, description="Provider calls before a payment needs reconciliation."
    )
    retry_base_delay: float = Field(0.2, gt=0, description="First retry delay in seconds.")
    retry_max_delay: float = Field(10.0, gt=0, description="Cap on the retry delay in seconds.")
    idempotency_retention_hours: float = Field(
        24.0,
        gt=0,
        description="How long the provider keeps idempotency keys; older unknown outcomes "
        "go to needs_reconciliation instead of being re-sent.",
    )
    reconcile_interval: float = Field(
        5.0,
        gt=0,
        description="Seconds between the leader's sweeps of needs_reconciliation "
        "payments (looked up in the provider's ledger by idempotency key).",
    )
    shutdown_grace: float = Field(
        2.0, ge=0, description="Seconds a stopping leader waits for in-flight provider calls."
    )
    shutdown_drain: float = Field(
        0.5,
        ge=0,
        le=30,
        description="Seconds a stopping replica keeps its listener open while answering 503 "
        "(and failing /readyz), so a load balancer stops sending before the socket closes.",
    )

    test_hooks: bool = Field(
        False,
        description="Expose /_test/* fault hooks (block the event loop). Tests only; never "
        "enable in production.",
    )

    _split = field_validator("etcd_endpoints", "api_keys", "admin_api_keys", mode="before")(
        _split_csv
    )

    @field_validator(
        "etcd_ca_file",
        "etcd_cert_file",
        "etcd_key_file",
        "etcd_username",
        "etcd_password",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # Compose and shell templates pass "${X:-}" as an empty string: that means "not set".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("etcd_ca_file", "etcd_cert_file", "etcd_key_file")
    @classmethod
    def _check_readable_file(cls, value: Path | None) -> Path | None:
        # Checked at start-up so that a typo fails here, naming the variable, and not at the
        # first etcd call as a TLS error.
        if value is None:
            return None
        if not value.exists():
            raise ValueError(f"no such file: {value}")
        if not value.is_file():
            raise ValueError(f"not a regular file: {value}")
        try:
            with value.open("rb"):
                pass
        except OSError as error:
            raise ValueError(
                f"cannot read {value} as uid {os.getuid()}: {error.strerror or error}"
            ) from None
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        # A driver suffix (postgresql+<driver>://) is accepted and ignored: the store picks
        # the driver itself (app.store.engine), so settings need not know its name.
        if scheme not in {"postgresql", "postgres"} and not scheme.startswith("postgresql+"):
            raise ValueError(f"must start with postgresql:// (got {scheme or 'no scheme'}://...)")
        return value

    @field_validator("provider_url")
    @classmethod
    def _check_provider_url(cls, value: str) -> str:
        # The leader's connections parse it; the same parse here makes a URL they cannot
        # use a configuration error at start-up instead of a failure at the first term.
        from app.dispatch.provider_http import parse_origin

        parse_origin(value)
        return value

    @field_validator("replica_role")
    @classmethod
    def _check_role(cls, value: str) -> str:
        if value.startswith("pg_"):
            raise ValueError("role names starting with pg_ are reserved by Postgres")
        return value

    @model_validator(mode="after")
    def _check_timing(self) -> Settings:
        if self.lease_safety_margin >= self.lease_ttl / 2:
            raise ValueError(
                f"lease_safety_margin ({self.lease_safety_margin}s) must be under half the "
                f"lease_ttl ({self.lease_ttl}s)"
            )
        if not self.etcd_endpoints:
            raise ValueError("etcd_endpoints must name at least one host:port")
        self._check_etcd_security()
        return self

    def _check_etcd_security(self) -> None:
        """Settings that only make sense together. Messages name each field involved, so
        the error names every variable to look at (and no other: see _variables)."""
        if (self.etcd_cert_file is None) != (self.etcd_key_file is None):
            raise ValueError(
                "etcd_cert_file and etcd_key_file go together: set both (a client "
                "certificate and its private key) or neither"
            )
        if self.etcd_cert_file is not None and self.etcd_ca_file is None:
            raise ValueError(
                "etcd_cert_file needs etcd_ca_file: a client certificate is sent over TLS "
                "only, and TLS needs the CA that signed the etcd members' certificates"
            )
        if (self.etcd_username is None) != (self.etcd_password is None):
            raise ValueError("etcd_username and etcd_password go together: set both or neither")
        schemes = {e.split("://", 1)[0] for e in self.etcd_endpoints if "://" in e}
        if "https" in schemes and self.etcd_ca_file is None:
            raise ValueError(
                "etcd_endpoints use https:// but etcd_ca_file is not set: TLS needs the CA "
                "that signed the etcd members' certificates"
            )
        if "http" in schemes and self.etcd_ca_file is not None:
            raise ValueError(
                "etcd_endpoints use plain http:// but etcd_ca_file turns TLS on: write the "
                "endpoints as https://NAME:2379 (or without a scheme)"
            )

    @property
    def public_url(self) -> str:
        """The URL this replica advertises in its leader record."""
        return self.advertise_url or f"http://{self.host}:{self.port}"

    @property
    def election_prefix(self) -> str:
        """etcd key prefix under which candidates of this cluster campaign."""
        return f"/paydispatch/{self.cluster_name}/election/"


S = TypeVar("S", bound=BaseSettings)


def build_settings(cls: type[S], prefix: str, what: str, overrides: dict[str, Any]) -> S:
    """``cls`` from the environment with non-None ``overrides`` (CLI flags) on top.

    Raises ConfigurationError naming every invalid variable and what is wrong with it.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_variables(cls, prefix, err['loc'], err['msg'])}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigurationError(f"invalid {what}: {problems}") from exc


def _variables(cls: type[BaseSettings], prefix: str, loc: tuple[Any, ...], msg: str) -> str:
    """The variable(s) an error is about: its field, or for a rule across fields every
    field the message names (so the operator knows which variables to look at)."""
    if loc:
        return prefix + ".".join(str(part) for part in loc).upper()
    named = [name for name in cls.model_fields if name in msg]
    return ", ".join(prefix + name.upper() for name in named) or f"{prefix}* settings"


def load_settings(**overrides: Any) -> Settings:
    """Replica settings from the environment, with non-None ``overrides`` on top."""
    return build_settings(Settings, ENV_PREFIX, "configuration", overrides)
