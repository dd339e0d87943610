"""Value types of the provider's ledger, shared by the ledger, the fault draws and the server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


class LedgerClosed(RuntimeError):
    """The ledger is closed (the provider is shutting down)."""


# The three records made per charge are named tuples, not frozen dataclasses: as immutable,
# and a frozen dataclass's __init__ (one object.__setattr__ per field) cost ~8 µs per charge
# on this VM, a visible share of the provider's CPU per charge.


class ChargeParams(NamedTuple):
    """The parameters a key is bound to: reusing the key with others is an error (422)."""

    amount: int
    currency: str
    reference: str | None


class NewCharge(NamedTuple):
    """A charge decided by the server, not yet recorded."""

    id: str
    idempotency_key: str
    status: str
    params: ChargeParams
    decline_code: str | None
    description: str | None
    metadata: dict[str, str] | None
    created_at: str


class Charge(NamedTuple):
    """A recorded charge; ``sequence`` is its position in the ledger."""

    sequence: int
    id: str
    idempotency_key: str
    status: str
    amount: int
    currency: str
    reference: str | None
    decline_code: str | None
    description: str | None
    metadata: dict[str, str] | None
    created_at: str

    @property
    def params(self) -> ChargeParams:
        """The parameters the charge's key is bound to."""
        return ChargeParams(self.amount, self.currency, self.reference)

    def to_json(self) -> dict[str, Any]:
        """The charge as the API shows it."""
        return {
            "id": self.id,
            "object": "charge",
            "status": self.status,
            "amount": self.amount,
            "currency": self.currency,
            "reference": self.reference,
            "description": self.description,
            "metadata": self.metadata,
            "decline_code": self.decline_code,
            "idempotency_key": self.idempotency_key,
            "created_at": self.created_at,
            "sequence": self.sequence,
        }


@dataclass(frozen=True, slots=True)
class Reserved:
    """The key was new; it is now ``processing`` and the caller must complete or release it."""


@dataclass(frozen=True, slots=True)
class AlreadyCharged:
    """The key was completed before: this is its charge."""

    charge: Charge


@dataclass(frozen=True, slots=True)
class InProgress:
    """The key is ``processing`` in the ledger (reserved and not yet completed)."""

    params: ChargeParams


ReserveResult = Reserved | AlreadyCharged | InProgress


@dataclass(frozen=True, slots=True)
class LedgerCounts:
    """Durable counts for /v1/stats."""

    succeeded: int
    declined: int
    last_sequence: int


@dataclass(frozen=True, slots=True)
class ChargePage:
    """One keyset page of the ledger."""

    charges: list[Charge]
    has_more: bool
