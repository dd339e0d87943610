"""Typed errors. The dispatcher acts on three families: retryable, terminal, unknown outcome.

Each class's docstring is its default message, so ``raise StaleLeader()`` already says what
went wrong in words an operator can act on.
"""

from __future__ import annotations


class PaydispatchError(Exception):
    """paydispatch failed."""

    # How a leadership term that ended on this error is counted (transitions metric).
    step_down_reason = "unexpected_error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(PaydispatchError):
    """The configuration is invalid; fix the PAYDISPATCH_* environment or the CLI flags."""


class DatabaseUnavailable(PaydispatchError):
    """Postgres is unreachable or not accepting connections; retry shortly."""

    step_down_reason = "database_unavailable"


class StaleLeader(PaydispatchError):
    """A newer leader holds the fence: this replica's fencing token is outdated and it must
    stop acting as leader at once."""

    step_down_reason = "fenced"


class TerminalStateViolation(PaydispatchError):
    """A payment in a terminal state was about to change; terminal states are final."""


class LeadershipLost(PaydispatchError):
    """This replica is no longer the leader (lease lost, expired or revoked)."""

    step_down_reason = "lost"


class EtcdUnavailable(PaydispatchError):
    """etcd is unreachable or timed out; leadership cannot be confirmed."""

    step_down_reason = "etcd_unavailable"


# --- provider call outcomes the dispatcher classifies -------------------------------------


class ProviderError(PaydispatchError):
    """The payment provider call did not end in a definite result."""


class RetryableProviderError(ProviderError):
    """The provider said 'try again' (5xx, 409 concurrent request with the same key, 429)."""

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds the provider asked us to wait, if it said


class UnknownOutcome(ProviderError):
    """The provider may or may not have charged (timeout, connection lost, response dropped,
    an answer that proves nothing); retry with the same key and the provider answers with the
    original result, or look the key up."""

    def __init__(self, message: str | None = None, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UnprovenCharge(UnknownOutcome):
    """The provider's ledger files a charge under the key, but its status proves neither a
    success nor a decline (pending, refunded, ...): nothing can be settled from it."""


class ChargeMismatch(ProviderError):
    """The provider answered with a charge that is not this payment's (another amount,
    currency, key or payment id): nothing is recorded as charged, and the payment waits for
    reconciliation, because something outside paydispatch is wrong (a shared provider
    account, a payments table reset while the provider's ledger survived, a broken proxy)."""

    def __init__(self, message: str | None = None, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TerminalProviderError(ProviderError):
    """The provider rejected the request as invalid; retrying cannot help."""

    def __init__(self, message: str | None = None, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
