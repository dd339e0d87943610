"""Calls to the payment provider, classified into the outcomes the dispatcher acts on.

Every call for a payment sends the payment's own provider key and identical parameters, so
any retry — by this leader or the next — is answered with the original result. What an
answer means is decided in ``app.domain.outcome``; this module only moves bytes, and never
follows a redirect (a POST turned into a GET at another address proves nothing).
"""

from __future__ import annotations

import aiohttp

from app.dispatch.http1 import Http1Pool, HttpError
from app.domain.outcome import Charge, charge_from_ledger, classify_charge_answer, decode_body
from app.domain.payment import ChargeRequest
from app.errors import UnknownOutcome


class ProviderClient:
    """A thin client: charges go over a lean keep-alive pool (``app.dispatch.http1``, at
    most ``max_connections`` at once), ledger lookups over the shared aiohttp session."""

    def __init__(
        self, base_url: str, session: aiohttp.ClientSession, *, max_connections: int = 100
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self._max_connections = max_connections
        self._charges: Http1Pool | None = None  # made on first use, on the running loop

    def close(self) -> None:
        """Close the idle charge connections (the session is its owner's to close)."""
        if self._charges is not None:
            self._charges.close()

    async def charge(self, request: ChargeRequest, *, timeout: float) -> Charge:
        """POST /v1/charges. Returns this payment's Charge, or raises what
        ``classify_charge_answer`` raises; a timeout or a lost connection is UnknownOutcome.
        """
        if self._charges is None:
            self._charges = Http1Pool(self.base_url, limit=self._max_connections)
        try:
            answer = await self._charges.post(
                "/v1/charges",
                request.body(),
                {"Idempotency-Key": request.provider_key, "Content-Type": "application/json"},
                timeout=timeout,
            )
        except TimeoutError as exc:
            raise UnknownOutcome(f"provider did not answer within {timeout:.2f}s") from exc
        except HttpError as exc:
            raise UnknownOutcome(f"provider connection failed: {exc}") from exc
        return classify_charge_answer(
            answer.status, answer.body, request, retry_after=answer.headers.get("retry-after")
        )

    async def find_by_key(self, provider_key: str, *, timeout: float) -> Charge | None:
        """Look a charge up in the provider's ledger by its key (reconciliation). Raises
        UnknownOutcome when the ledger cannot be read or answers something unusable."""
        try:
            async with self.session.get(
                f"{self.base_url}/v1/charges",
                params={"idempotency_key": provider_key, "limit": "1"},
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    raise UnknownOutcome(
                        f"ledger lookup answered {resp.status}", status=resp.status
                    )
                payload = decode_body(await resp.read())
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UnknownOutcome(f"ledger lookup failed: {exc}") from exc
        return charge_from_ledger(payload, provider_key)
