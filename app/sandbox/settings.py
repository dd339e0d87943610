"""Settings of the stand-in payment provider, read from ``PAYDISPATCH_PROVIDER_*`` variables.

Kept apart from the replicas' settings on purpose: the provider is a separate process (a fake
third party) and must never share configuration with the replicas that call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "PAYDISPATCH_PROVIDER_"

Rate = Annotated[float, Field(ge=0.0, le=1.0)]


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class SandboxSettings(BaseSettings):
    """Settings of the stand-in provider. Every field is overridable by the environment
    variable ``PAYDISPATCH_PROVIDER_<FIELD NAME IN UPPER CASE>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # --- where it runs ------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the provider listens on.")
    port: int = Field(
        8081, ge=0, le=65535, description="Port the provider listens on (0: any free port)."
    )
    ledger_path: Path = Field(
        Path("./provider-ledger.sqlite3"),
        description="SQLite file holding every charge and idempotency key; created on start "
        "and kept across restarts.",
    )
    durable_commits: bool = Field(
        False,
        description="SQLite synchronous=FULL: charges also survive power loss, at a throughput "
        "cost. The default (NORMAL, WAL) survives any crash of the provider process.",
    )
    max_body_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest accepted request body in bytes (else 413)."
    )
    shutdown_grace: float = Field(
        2.0, ge=0, description="Seconds in-flight requests get to finish on SIGTERM/SIGINT."
    )
    access_log: bool = Field(
        False, description="Log every request (costly under load, handy when debugging)."
    )

    # --- latency and faults -------------------------------------------------------------
    latency_ms_min: float = Field(
        0.0, ge=0, description="Lower bound of the uniform latency added to each new charge."
    )
    latency_ms_max: float = Field(
        0.0, ge=0, description="Upper bound of the uniform latency added to each new charge."
    )
    error_rate: Rate = Field(
        0.0,
        description="Share of charge requests answered 500 or 503 before anything is done "
        "(no charge).",
    )
    timeout_rate: Rate = Field(
        0.0,
        description="Share of charge requests that hang for hang_seconds before answering "
        "504 (no charge); longer than any sane client timeout.",
    )
    hang_seconds: float = Field(
        30.0, gt=0, description="How long a request drawn for timeout_rate hangs."
    )
    drop_rate: Rate = Field(
        0.0,
        description="Share of new charges that ARE made and recorded, after which the "
        "connection is closed without a response (the 'response lost' case).",
    )
    conflict_rate: Rate = Field(
        0.0,
        description="Share of charge requests answered 409 as if the same key were still "
        "being processed (no charge).",
    )
    decline_rate: Rate = Field(
        0.0, description="Share of new charges declined at random (402, recorded)."
    )
    decline_amounts: Annotated[tuple[int, ...], NoDecode] = Field(
        (), description="Comma-separated amounts (minor units) that are always declined."
    )
    decline_references: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Comma-separated references that are always declined."
    )
    key_retention_hours: float = Field(
        24.0,
        gt=0,
        description="Idempotency keys are kept at least this long (this provider never "
        "purges, so in practice forever).",
    )
    seed: int | None = Field(
        None, description="Seed of the fault and decline draws, for reproducible runs."
    )

    _split = field_validator("decline_amounts", "decline_references", mode="before")(_split_csv)

    @model_validator(mode="after")
    def _check_latency(self) -> SandboxSettings:
        if self.latency_ms_max < self.latency_ms_min:
            raise ValueError(
                f"latency_ms_max ({self.latency_ms_max}) must not be below latency_ms_min "
                f"({self.latency_ms_min})"
            )
        return self

    @property
    def public_url(self) -> str:
        """Base URL for clients, as configured (port 0 is only known once bound)."""
        return f"http://{self.host}:{self.port}"


class SandboxConfigError(ValueError):
    """The stand-in provider's configuration is invalid (PAYDISPATCH_PROVIDER_* or flags)."""


def load_sandbox_settings(**overrides: Any) -> SandboxSettings:
    """Build provider settings from the environment with non-None ``overrides`` on top.

    Raises SandboxConfigError naming every invalid variable and what is wrong with it.
    """
    try:
        return SandboxSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        listed = "; ".join(
            f"{_named(err['loc'], err['msg'])}: {err['msg']}" for err in exc.errors()
        )
        raise SandboxConfigError(f"invalid provider configuration: {listed}") from exc


def _named(loc: tuple[Any, ...], msg: str) -> str:
    """The variable an error is about; for a rule across fields, each field it mentions."""
    if loc:
        return ENV_PREFIX + ".".join(str(part) for part in loc).upper()
    named = [ENV_PREFIX + name.upper() for name in SandboxSettings.model_fields if name in msg]
    return ", ".join(named) or f"{ENV_PREFIX}* settings"
