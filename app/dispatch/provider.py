"""Calls to the payment provider, classified into the outcomes the dispatcher acts on.

Every call for a payment sends the payment's own provider key and identical parameters, so
any retry — by this leader or the next — is answered with the original result. What an
answer means is decided in ``app.domain.outcome``; this module only moves bytes (over
``app.dispatch.provider_http``'s keep-alive connections), and never follows a redirect (a
POST turned into a GET at another address proves nothing).
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlencode

from app.dispatch.provider_http import ProviderConnections, ProviderHTTPError, ProviderHTTPTimeout
from app.domain.outcome import Charge, charge_from_ledger, classify_charge_answer, decode_body
from app.domain.payment import ChargeRequest
from app.errors import UnknownOutcome

_JSON = ("Content-Type", "application/json")


class ProviderClient(contextlib.AbstractAsyncContextManager["ProviderClient"]):
    """The provider's charge and ledger endpoints over a bounded set of keep-alive
    connections (``connections``: as many as calls may be in flight). Close it with
    ``close()`` or use it as an async context manager."""

    def __init__(self, base_url: str, *, connections: int = 4) -> None:
        self.base_url = base_url.rstrip("/")
        self.charges_url = f"{self.base_url}/v1/charges"
        self._http = ProviderConnections(self.base_url, limit=connections)

    async def charge(
        self, request: ChargeRequest, *, timeout: float, traceparent: str | None = None
    ) -> Charge:
        """POST /v1/charges. Returns this payment's Charge, or raises what
        ``classify_charge_answer`` raises; a timeout or a lost connection is UnknownOutcome.
        ``traceparent`` (tracing on) goes along so the provider's spans join the trace.
        """
        headers = [("Idempotency-Key", request.provider_key), _JSON]
        if traceparent is not None:
            headers.append(("traceparent", traceparent))
        try:
            answer = await self._http.request(
                "POST", "/v1/charges", headers=headers, body=request.body(), timeout=timeout
            )
        except ProviderHTTPTimeout as exc:
            raise UnknownOutcome(f"provider did not answer within {timeout:.2f}s") from exc
        except ProviderHTTPError as exc:
            raise UnknownOutcome(f"provider connection failed: {exc}") from exc
        return classify_charge_answer(
            answer.status, answer.body, request, retry_after=answer.headers.get("retry-after")
        )

    async def find_by_key(self, provider_key: str, *, timeout: float) -> Charge | None:
        """Look a charge up in the provider's ledger by its key (reconciliation). Raises
        UnknownOutcome when the ledger cannot be read or answers something unusable."""
        query = urlencode({"idempotency_key": provider_key, "limit": "1"})
        try:
            answer = await self._http.request("GET", f"/v1/charges?{query}", timeout=timeout)
        except ProviderHTTPError as exc:
            raise UnknownOutcome(f"ledger lookup failed: {exc}") from exc
        if answer.status != 200:
            raise UnknownOutcome(f"ledger lookup answered {answer.status}", status=answer.status)
        return charge_from_ledger(decode_body(answer.body), provider_key)

    async def close(self) -> None:
        """Close the connections; calls after this fail with UnknownOutcome."""
        await self._http.close()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
