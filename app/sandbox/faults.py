"""Fault and decline draws of the stand-in provider.

Every charge request that passes validation draws the same fixed number of values from one
``random.Random`` in the same order, whichever branch it then takes, so a seeded run given
the same sequence of requests injects the same faults. Charge ids do NOT come from this
generator: with a fixed seed they would repeat after a restart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from app.sandbox.records import ChargeParams
from app.sandbox.settings import SandboxSettings


@dataclass(frozen=True, slots=True)
class FaultDraw:
    """What happens to one charge request.

    Precedence: ``error_status`` over ``hang`` over ``conflict`` (all three answer before
    anything is recorded); ``drop`` and ``random_decline`` only matter for a new charge.
    """

    error_status: int | None
    hang: bool
    conflict: bool
    drop: bool
    random_decline: bool
    latency_seconds: float


class FaultInjector:
    """Draws faults, latency and declines according to the settings."""

    def __init__(self, settings: SandboxSettings) -> None:
        self._settings = settings
        self._rng = random.Random(settings.seed)
        self._decline_amounts = frozenset(settings.decline_amounts)
        self._decline_references = frozenset(settings.decline_references)
        s = settings
        # With no fault rates and a fixed latency every draw without a random decline is
        # this one: made once, not per charge.
        self._quiet: FaultDraw | None = None
        if (
            max(s.error_rate, s.timeout_rate, s.conflict_rate, s.drop_rate) <= 0
            and s.latency_ms_max == s.latency_ms_min
        ):
            self._quiet = FaultDraw(
                error_status=None,
                hang=False,
                conflict=False,
                drop=False,
                random_decline=False,
                latency_seconds=s.latency_ms_min / 1000.0,
            )

    def draw(self) -> FaultDraw:
        """The fate of the next charge request."""
        s = self._settings
        # Seven draws in a fixed order, whatever the rates (see the module doc).
        random = self._rng.random
        u_error = random()
        u_status = random()
        u_hang = random()
        u_conflict = random()
        u_drop = random()
        u_decline = random()
        u_latency = random()
        if self._quiet is not None and u_decline >= s.decline_rate:
            return self._quiet  # no fault can be drawn: the same answer every time
        latency_ms = s.latency_ms_min + (s.latency_ms_max - s.latency_ms_min) * u_latency
        return FaultDraw(
            # u < rate: never for rate 0, always for rate 1 (random() is in [0, 1)).
            error_status=(500 if u_status < 0.5 else 503) if u_error < s.error_rate else None,
            hang=u_hang < s.timeout_rate,
            conflict=u_conflict < s.conflict_rate,
            drop=u_drop < s.drop_rate,
            random_decline=u_decline < s.decline_rate,
            latency_seconds=latency_ms / 1000.0,
        )

    def decline_code(self, params: ChargeParams, draw: FaultDraw) -> str | None:
        """Why a new charge with these parameters is declined, or None to let it succeed."""
        if params.amount in self._decline_amounts:
            return "insufficient_funds"
        if params.reference is not None and params.reference in self._decline_references:
            return "do_not_honor"
        if draw.random_decline:
            return "card_declined"
        return None
